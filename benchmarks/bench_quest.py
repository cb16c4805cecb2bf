"""Quest's sparse decode step against dense attention over the same layer.

One decode step (q = 1) over n = 16K, 32K and 64K slots with a token budget
of 1,024 (64 pages of 16): the dense kernel (``ops.attention``) against
Quest's whole step (``PagedStore.attend``: page scores, top-k pages, attention
over them by index), with the page-score share of the step timed on its own.
Shapes: SmolLM2-135M's attention (Hq=9, Hkv=3, D=64) and a Llama-3-8B-like
one (Hq=32, Hkv=8, D=128), float32 and bfloat16. All variants of a case run
interleaved rep by rep, so background load hits them alike.

``--layouts ragged`` times the same step over a per-head layer (what AdaKV or
EMS keeps: ``RaggedPagedStore``), head h of H holding ``n * (1 - h / (2H))``
slots with merge counts, against the ragged dense kernel over the same slots.

    python benchmarks/bench_quest.py
    python benchmarks/bench_quest.py --quick --no-write

Writes benchmarks/results/bench_quest.json and appends a section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch

from kvcompress import ops
from kvcompress.stores import AttentionSpec, PagedStore, RaggedPagedStore, RaggedStore

from _common import command_line, machine, machine_line, now, time_many, write_results  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}
LENGTHS = (16384, 32768, 65536)
PAGE = 16


def add_sweep_args(ap: argparse.ArgumentParser) -> None:
    """The options of a decode-step sweep (also bench_magicpig's)."""
    ap.add_argument("--threads", default="1", help="comma-separated thread counts")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per case (at least 5 reps)")
    ap.add_argument("--quick", action="store_true", help="n = 16K only, for a smoke run")
    ap.add_argument("--no-write", action="store_true", help="print only")


def sweep(args, make_case):
    """Time ``make_case(shape, n, dtype, g) -> (fns, extra)`` for every
    shape x dtype x length x thread count, the variants of a case
    interleaved rep by rep; yields ``(record, seconds per variant, extra)``."""
    threads = sorted({int(x) for x in args.threads.split(",")})
    lengths = [LENGTHS[0]] if args.quick else list(LENGTHS)
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for n in lengths:
                fns, extra = make_case(shape, n, dtype, g)
                for nt in threads:
                    torch.set_num_threads(nt)
                    ops.set_num_threads(nt)
                    t, reps = time_many(fns, args.min_time)
                    yield dict(shape=shape, dtype=dname, n=n, threads=nt, reps=reps), t, extra


def case(shape: str, n: int, dtype, budget: int, g: torch.Generator):
    Hq, Hkv, D = SHAPES[shape]
    q = torch.randn(1, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    store = PagedStore(PAGE, budget)
    store.append(k, v, 0)
    spec = AttentionSpec(scaling=D ** -0.5)
    pages = store.pages_to_read(q)
    fns = {
        "dense": lambda: ops.attention(q, k, v),
        "quest": lambda: store.attend(q, spec),
        "scores": lambda: ops.page_scores(q[:, :, -1], store.kmin, store.kmax, store.num_pages, PAGE),
        "pages only": lambda: ops.attention_pages(q, k, v, pages, PAGE),
    }
    # the sparse step computes attention over the pages it chose
    out = fns["quest"]()
    assert store.last_pages is not None and torch.equal(store.last_pages, pages)
    assert torch.equal(out, fns["pages only"]())
    return fns, None


def ragged_case(shape: str, n: int, dtype, budget: int, g: torch.Generator):
    """The step over a per-head layer: head h keeps ``n * (1 - h / (2 Hkv))``
    slots (the newest one last) with merge counts in [1, 4)."""
    Hq, Hkv, D = SHAPES[shape]
    q = torch.randn(1, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    keep = (torch.arange(n)[None, None, :] < (n * (1 - torch.arange(Hkv) / (2 * Hkv))).long()[None, :, None])
    counts = 1 + 3 * torch.rand(1, Hkv, n, generator=g)
    pos = torch.arange(n, dtype=torch.int32).expand(1, Hkv, n)
    store = RaggedPagedStore.from_ragged(RaggedStore.from_dense(k, v, pos, keep, counts=counts), PAGE, budget)
    spec = AttentionSpec(scaling=D ** -0.5, count_bias=True)
    pages = store.pages_to_read(q).contiguous()
    M = -(-store.max_length() // PAGE)
    lay = dict(offsets=store.offsets, lengths=store.lengths)
    fns = {
        "dense": lambda: ops.attention(q, store.k, store.v, counts=store.counts, **lay),
        "quest": lambda: store.attend(q, spec),
        "scores": lambda: ops.page_scores(q[:, :, -1], store.kmin, store.kmax, M, PAGE, lengths=store.lengths,
                                          page_offsets=store.page_offsets),
        "pages only": lambda: ops.attention_pages(q, store.k, store.v, pages, PAGE, counts=store.counts, **lay),
    }
    out = fns["quest"]()
    assert store.last_pages is not None and torch.equal(store.last_pages, pages)
    assert torch.equal(out, fns["pages only"]())
    return fns, None


def _record(records: list, rec: dict, t: dict, budget: int) -> None:
    rec.update(budget=budget, dense_us=t["dense"] * 1e6, quest_us=t["quest"] * 1e6,
               scores_us=t["scores"] * 1e6, pages_us=t["pages only"] * 1e6, speedup=t["dense"] / t["quest"],
               score_share=t["scores"] / t["quest"])
    records.append(rec)
    print(f"{rec['layout']} {rec['shape']} {rec['dtype']} n={rec['n']} {rec['threads']}t dense "
          f"{rec['dense_us']:9.1f} us  quest {rec['quest_us']:8.1f} (scores {rec['scores_us']:7.1f}, pages "
          f"{rec['pages_us']:7.1f})  x{rec['speedup']:.2f}  scores {100 * rec['score_share']:.0f}% of the step",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=1024, help="token budget (slots read per step)")
    ap.add_argument("--layouts", default="uniform,ragged", help="comma-separated: uniform, ragged")
    add_sweep_args(ap)
    args = ap.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    bad = sorted(set(layouts) - {"uniform", "ragged"})
    if bad:
        ap.error(f"--layouts: unknown {bad}; expected uniform and/or ragged")
    info = machine()
    records = []
    for layout in layouts:
        make = case if layout == "uniform" else ragged_case
        for rec, t, _ in sweep(args, lambda shape, n, dtype, g: make(shape, n, dtype, args.budget, g)):
            rec["layout"] = layout
            _record(records, rec, t, args.budget)
    command = command_line(__file__, argv)
    result = dict(command=command, date=now(), machine=info, page=PAGE, records=records)
    if args.no_write:
        return result
    lines = [
        f"## bench_quest ({result['date']})",
        "",
        f"Command: `{command}`",
        "",
        machine_line(info),
        f"Decode step (q = 1), B=1, token budget {args.budget} ({args.budget // PAGE} pages of {PAGE}). dense = "
        "ops.attention over all n slots; quest = PagedStore.attend (page scores + top-k pages + attention over "
        "them by index); scores = ops.page_scores alone; pages = ops.attention_pages alone. Medians of "
        "interleaved reps; x = dense / quest. ragged: the same over a per-head layer (RaggedPagedStore), head h "
        "holding n(1 - h/(2 Hkv)) slots with merge counts, dense = ops.attention on that layout.",
        "",
        "| layout | shape | dtype | n | threads | dense us | quest us | scores us | pages us | x dense | scores share |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['layout']} | {r['shape']} | {r['dtype']} | {r['n']} | {r['threads']} | {r['dense_us']:.1f} | "
                     f"{r['quest_us']:.1f} | {r['scores_us']:.1f} | {r['pages_us']:.1f} | {r['speedup']:.2f} | "
                     f"{100 * r['score_share']:.0f}% |")
    write_results("bench_quest", result, lines)
    return result


if __name__ == "__main__":
    main()
