"""Where greedy generate() on the GPU leaves the CPU's tokens: the first
``kvcompress.ops`` call whose inputs or outputs differ between the devices.

Runs each method on the test suite's tiny random Llama (``tests/conftest.py``'s
``tiny_model``, two 300-token prompts, 24 new tokens) on the CPU and on CUDA,
recording every call of a public ``kvcompress.ops`` function: its tensor
inputs and outputs, copied to the host. Then walks both records in order and
prints the first calls where an integer tensor differs, a float tensor's
finite/non-finite pattern differs, or a float differs by more than
``--rtol`` of its largest magnitude. Inputs that already differ point at
Python between two ops (a torch call that breaks ties differently on CUDA,
say); outputs that differ from equal inputs point at the op.

    python benchmarks/gpu_divergence.py ems ems+tidaldecode   # on a GPU machine
    python benchmarks/gpu_divergence.py --list

Found on an H200 (2026-12-04): EMS's local picks used ``torch.topk`` over a
max-pooled ranking full of exact ties (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

import kvcompress
from kvcompress import ops

METHODS = {
    "ems": lambda: kvcompress.EMS(budget=128),
    "ems+tidaldecode": lambda: kvcompress.EMS(budget=128) + kvcompress.TidalDecode(token_budget=48,
                                                                                   selection_layers=(1,)),
    "ems+magicpig": lambda: kvcompress.EMS(budget=128) + kvcompress.MagicPIG(K=4, L=30, window=16, dense_layers=1),
    "tidaldecode": lambda: kvcompress.TidalDecode(token_budget=48, selection_layers=(1,)),
    "snapkv+kivi4": lambda: kvcompress.SnapKV(budget=64) + kvcompress.KIVI(bits=4, group=32, residual=64),
}


def record(log: list):
    """Wraps every public ops function so that each call appends
    ``(name, inputs, outputs)`` (host copies of its tensors) to ``log``;
    returns a function that undoes it."""
    saved = {}
    for name in ops.__all__:
        f = getattr(ops, name)
        if not callable(f) or isinstance(f, type) or name in ("set_num_threads", "get_num_threads"):
            continue

        @functools.wraps(f)
        def wrapped(*a, _f=f, _name=name, **k):
            out = _f(*a, **k)
            outs = out if isinstance(out, tuple) else (out,)
            host = [x.detach().cpu().clone() for x in (*a, *k.values()) if torch.is_tensor(x)]
            log.append((_name, host, [o.detach().cpu().clone() for o in outs if torch.is_tensor(o)]))
            return out

        saved[name] = f
        setattr(ops, name, wrapped)
    return lambda: [setattr(ops, n, f) for n, f in saved.items()]


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def run(model, ids, make, device: str):
    log: list = []
    undo = record(log)
    try:
        model.to(device)
        with kvcompress.compress(model, make()):
            out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=24,
                                 do_sample=False)
    finally:
        undo()
        model.to("cpu")
    return out.cpu(), log


def difference(x: torch.Tensor, y: torch.Tensor, rtol: float) -> str | None:
    """Why two recorded tensors differ, or None."""
    if x.shape != y.shape:
        return f"shapes {tuple(x.shape)} / {tuple(y.shape)}"
    if not x.is_floating_point():
        n = int((x != y).sum())
        return f"{n} of {x.numel()} integers differ" if n else None
    fx, fy = torch.isfinite(x), torch.isfinite(y)
    if not torch.equal(fx, fy):
        return f"non-finite at different places ({int((fx != fy).sum())} elements)"
    both = fx & fy
    if not both.any():
        return None
    d = (x.double() - y.double())[both].abs().max()
    scale = x.double()[both].abs().max().clamp_min(1e-30)
    return f"max |cpu - gpu| {float(d):.3g} ({float(d / scale):.2g} of the largest)" if d > rtol * scale else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", nargs="*", default=["ems"], help="names from --list")
    ap.add_argument("--list", action="store_true", help="print the method names and exit")
    ap.add_argument("--rtol", type=float, default=1e-5, help="float difference reported, relative to the largest")
    ap.add_argument("--show", type=int, default=4, help="differing calls printed per method")
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a self-check)")
    args = ap.parse_args()
    if args.list:
        print("\n".join(sorted(METHODS)))
        return 0
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; --list shows the names")
    if args.device != "cpu" and not (torch.cuda.is_available() and ops.has_cuda):
        print("gpu_divergence.py: needs a GPU and a CUDA build of kvcompress (KVCOMPRESS_CUDA=1)", file=sys.stderr)
        return 3
    model = tiny_model()
    ids = torch.randint(3, 512, (2, 300), generator=torch.Generator().manual_seed(0))
    for name in args.methods:
        (tc, lc), (tg, lg) = (run(model, ids, METHODS[name], d) for d in ("cpu", args.device))
        same = torch.equal(tc, tg)
        first = "" if same else f", first differing new token {int((tc != tg)[:, ids.shape[1]:].any(0).nonzero()[0])}"
        print(f"== {name}: tokens equal {same}{first}; ops calls {len(lc)} (cpu) / {len(lg)} (gpu)")
        shown = 0
        for i, ((nc, ic, oc), (ng, ig, og)) in enumerate(zip(lc, lg)):
            if nc != ng:
                print(f"  call {i}: {nc} on the cpu, {ng} on the gpu")
                break
            why = [f"input {j}: {w}" for j, (x, y) in enumerate(zip(ic, ig)) if (w := difference(x, y, args.rtol))]
            why += [f"output {j}: {w}" for j, (x, y) in enumerate(zip(oc, og)) if (w := difference(x, y, args.rtol))]
            if why:
                print(f"  call {i} {nc}: " + "; ".join(why))
                shown += 1
                if shown >= args.show:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
