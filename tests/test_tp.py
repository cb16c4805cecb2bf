"""Tensor parallelism: compressed generate() under ``torchrun --nproc-per-node 2``.

transformers' tensor-parallel plan ("auto") shards q/k/v column-wise, so on
a Llama with 2 kv heads each of the 2 ranks runs attention (and so the
kvcompress cache) over its own kv head and the query heads of its group;
o_proj is row-wise with an all-reduce. CPU ranks talk over gloo.

Each rank compresses its own heads. A method whose choice for a head
depends only on that head (SnapKV, H2O, StreamingLLM, EMS with uniform head
budgets and per-head local picks) keeps the same tokens as one process. SnapKV, H2O and EMS (with
its default adaptive head budgets) must give one process's tokens: for
adaptive EMS that needs the layer's head budgets computed over all ranks'
heads (today each rank shares the layer budget among its own heads only,
and the tokens differ). AdaKV and TOVA (attention averaged over all heads)
share budgets or scores across the layer too; for them only the layer-wide
total is checked: over all ranks, the slots kept are heads x budget.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvcompress as kvc
from kvcompress.methods import method_from_spec

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
WORLD = 2
NEW = 12
PAD = 0
#: methods that decide each kv head on its own: 2 processes give one process's tokens
SAME = ["full", "snapkv@48", "h2o@48", "ems:head_budget=uniform:local_heads=own@48", "streamingllm@48"]
#: layer-wide budgets or scores (AdaKV, EMS's default adaptive heads and
#: layer-shared local picks, TOVA's mean over heads): a rank shares them over its own heads only, by design
#: (docs/design.md, "Tensor parallelism")
SHARED = ["adakv@48", "ems@48", "tova@48"]


def _skip_reason():
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend (needed for CPU ranks)"
    try:
        from transformers import LlamaConfig
    except ImportError as e:  # pragma: no cover
        return f"transformers: {e}"
    if not getattr(LlamaConfig, "base_model_tp_plan", None):
        return "this transformers has no tensor-parallel plan for Llama"
    if importlib.util.find_spec("torch.distributed.run") is None:
        return "torch.distributed.run (torchrun) is not available"
    return None


@pytest.fixture(scope="module")
def tp_setup(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tp_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=WORLD, head_dim=16, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2, initializer_range=0.1,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 300, (2, 96), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :30], mask[0, :30] = PAD, 0  # left padded row
    torch.save({"ids": ids, "mask": mask, "new": NEW, "pad": PAD}, folder / "prompt.pt")

    prefix = folder / "out"
    env = dict(os.environ)
    root = str(Path(kvc.__file__).resolve().parents[1])  # the kvcompress this test imports
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           str(HERE / "tp_worker.py"), str(folder), str(prefix), ",".join(SAME + SHARED)]
    # its own session, so that a hung run is ended with all its workers
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{stderr[-3000:]}")
    ranks = []
    for r in range(WORLD):
        path = Path(f"{prefix}.rank{r}.json")
        if not path.exists():
            pytest.fail(f"rank {r} wrote no result (torchrun exit {proc.returncode}):\n{stderr[-4000:]}")
        ranks.append(json.loads(path.read_text()))
    errors = [r["error"] for r in ranks if "error" in r]
    assert not errors, f"a rank failed:\n{errors[0]}"
    single = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, use_kernels=False).eval()
    return single, ids, mask, ranks


def _single(model, ids, mask, spec):
    name, _, budget = spec.partition("@")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
              pad_token_id=PAD)
    with torch.no_grad():
        if name == "full":
            return model.generate(**kw).tolist(), None
        with kvc.compress(model, method_from_spec(name, budget=int(budget))) as session:
            out = model.generate(**kw)
    return out.tolist(), [layer.head_lengths() for layer in session.cache.layers]


def test_ranks_hold_their_share_of_kv_heads(tp_setup):
    _, _, _, ranks = tp_setup
    assert [r["world"] for r in ranks] == [WORLD] * WORLD
    for r in ranks:
        # head_lengths are per (row, kv head): 2 rows x 1 local kv head per layer on each rank
        assert all(len(lengths) == 2 for lengths in r["snapkv@48"]["head_lengths"]), r["snapkv@48"]
        assert r["full"]["tokens"] == ranks[0]["full"]["tokens"]


@pytest.mark.parametrize("spec", SAME)
def test_per_head_methods_match_one_process(tp_setup, spec):
    model, ids, mask, ranks = tp_setup
    tokens, _ = _single(model, ids, mask, spec)
    for r in ranks:
        assert r[spec]["tokens"] == tokens, (
            f"{spec}: rank {r['rank']} of {WORLD} generated {[row[-NEW:] for row in r[spec]['tokens']]}, "
            f"one process {[row[-NEW:] for row in tokens]}"
        )


@pytest.mark.parametrize("spec", SHARED)
def test_layer_wide_budgets_are_shared_within_a_rank(tp_setup, spec):
    """However a layer-wide budget is shared out (per rank today, over all
    ranks once head budgets are gathered), all ranks together keep
    (kv heads) x (budget + generated - 1) slots per layer, as one process does."""
    model, ids, mask, ranks = tp_setup
    _, single = _single(model, ids, mask, spec)
    for r in ranks:
        assert r[spec]["tokens"][0][: ids.shape[1]] == ids[0].tolist()
    for li, one in enumerate(single):
        together = [n for r in ranks for n in r[spec]["head_lengths"][li]]
        assert len(together) == len(one)  # (rows x kv heads) over all ranks
        assert sum(together) == sum(one), (spec, li, together, one)
