"""Why a query-aware reader misses a passkey: where Quest ranks the needle's
page and whether MagicPIG samples the needle, at the first sparse decode step
of every layer it reads sparsely.

One passkey prompt (``--filler`` tokens, key at ``--depth``, seed 0, as the
eval's first case), greedy. For each sparse layer, per query head:

* Quest (``--budget`` slots read): the rank of the page holding the key's
  first digit among the layer's pages under the head's own page bound, under
  the kv head's GQA-reduced bound (what Quest selects by), and under the
  exact largest logit of the page; and whether the step read that page;
* MagicPIG (defaults): the exact softmax weight of the key's strongest digit,
  its cosine with the query after centering (what SimHash collisions depend
  on), the largest such cosine over the layer, the digit's inclusion
  probability ``P[Binomial(L, u^K) >= hits]``, whether the step included it,
  and the share of the exact attention mass the included slots carry.

    python benchmarks/diag_readers_needle.py --model gemma3
    python benchmarks/diag_readers_needle.py --model smollm2

Prints tables (no file written): a diagnosis, not a benchmark.
"""

from __future__ import annotations

import argparse
import math

import torch

import kvcompress as kvc
from kvcompress import ops
from kvcompress.model import load_model
from kvcompress.stores import LSHStore, PagedStore
from kvcompress.tasks import passkey_prompt
from kvcompress.testing import _text, passkey_case


def needle_positions(tok, prompt) -> list[int]:
    """Token positions of the key's digits in the prompt."""
    toks = [tok.decode([int(t)]).strip() for t in prompt.input_ids[0]]
    return [i for i, t in enumerate(toks) if t and t.isdigit() and t in prompt.key]


def _rank(row: torch.Tensor, i: int) -> int:
    return int((row > row[i]).sum())


def quest_rows(store: PagedStore, query, pages, needle: list[int]) -> list[str]:
    q = query[0, :, -1].float()  # [Hq, D]
    g = q.shape[0] // store.heads
    lo, hi = store.kmin[0].float().repeat_interleave(g, 0), store.kmax[0].float().repeat_interleave(g, 0)
    bound = torch.maximum(q[:, None] * hi, q[:, None] * lo).sum(-1)  # [Hq, pages]
    keys = store.keys[0].float().repeat_interleave(g, 0)
    logits = torch.einsum("hd,hnd->hn", q, keys)
    P = store.page
    pad = (-logits.shape[1]) % P
    page_max = torch.nn.functional.pad(logits, (0, pad), value=-math.inf).view(q.shape[0], -1, P).amax(-1)
    p = needle[0] // P
    out = []
    for hq in range(q.shape[0]):
        h = hq // g
        reduced = bound[h * g:(h + 1) * g].amax(0)
        read = p in pages[0, h].tolist()
        out.append(f"| {hq} | {_rank(bound[hq], p)} | {_rank(reduced, p)} | {_rank(page_max[hq], p)} | "
                   f"{'yes' if read else 'no'} |")
    return out


def pig_rows(store: LSHStore, query, scaling: float, needle: list[int]) -> list[str]:
    g = int(query.shape[1]) // store.heads
    qcodes = ops.simhash(query, store.planes, store.K, group=g)
    k = store.keys[0].float()
    n = int(k.shape[1])
    out = []
    for hq in range(int(query.shape[1])):
        h = hq // g
        q = query[0, hq, 0].float()
        p = torch.softmax(scaling * (k[h] @ q), 0)
        kc = k[h] - store.center[0, h].float()
        cos = (kc @ q) / (kc.norm(dim=-1) * q.norm())
        inc = (store.codes[0, h] == qcodes[0, hq, 0]).sum(-1) >= store.hits
        inc[: store.sinks] = True
        inc[n - store.window:] = True
        j = max(needle, key=lambda t: float(p[t]))
        u = 1 - math.acos(max(-1.0, min(1.0, float(cos[j])))) / math.pi
        pk = u ** store.K
        prob = 1 - sum(math.comb(store.L, i) * pk ** i * (1 - pk) ** (store.L - i) for i in range(store.hits))
        out.append(f"| {hq} | {float(p[j]):.3f} | {float(cos[j]):.3f} | {float(cos.max()):.3f} | {prob:.3f} | "
                   f"{'yes' if bool(inc[j]) else 'no'} | {float(p[inc].sum()):.3f} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3", help="smollm2 or gemma3 (packaged models)")
    ap.add_argument("--filler", type=int, default=1000)
    ap.add_argument("--depth", type=float, default=0.1)
    ap.add_argument("--budget", type=int, default=512, help="Quest's token budget")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    prompt = passkey_prompt(tok, args.filler, args.depth, filler_text=_text(None), seed=0)
    needle = needle_positions(tok, prompt)
    print(f"{args.model}: key {prompt.key}, digits at positions {needle}, {prompt.input_ids.shape[1]} tokens")

    tables: list[list[str]] = []
    paged_attend = PagedStore.attend

    def spy_quest(self, query, spec, kv_start=None, query_pos=None):
        out = paged_attend(self, query, spec, kv_start=kv_start, query_pos=query_pos)
        if self.sparse_steps == 1 and self.last_pages is not None and len(tables) < 64 and \
                not getattr(self, "_diag_done", False):
            self._diag_done = True
            tables.append(quest_rows(self, query, self.last_pages, needle))
        return out

    PagedStore.attend = spy_quest
    try:
        case = passkey_case(model, tok, kvc.Quest(token_budget=args.budget), args.filler, args.depth, seed=0)
    finally:
        PagedStore.attend = paged_attend
    print(f"\nQuest(token_budget={args.budget}): answer {case.answer!r} ({'right' if case.ok else 'wrong'}); "
          f"rank of page {needle[0] // 16} (0 = first) at the first sparse step")
    for i, rows in enumerate(tables):
        print(f"\nsparse layer {i}\n| query head | own bound | GQA-max bound | exact page max | read |\n|---|---:|---:|---:|---|")
        print("\n".join(rows))

    tables.clear()
    lsh_attend = LSHStore.attend

    def spy_pig(self, query, spec, kv_start=None, query_pos=None):
        out = lsh_attend(self, query, spec, kv_start=kv_start, query_pos=query_pos)
        if self.sampled_steps == 1 and not getattr(self, "_diag_done", False):
            self._diag_done = True
            tables.append(pig_rows(self, query, spec.scaling, needle))
        return out

    LSHStore.attend = spy_pig
    method = kvc.MagicPIG()
    try:
        case = passkey_case(model, tok, method, args.filler, args.depth, seed=0)
    finally:
        LSHStore.attend = lsh_attend
    print(f"\n{method.describe()}: answer {case.answer!r} ({'right' if case.ok else 'wrong'}); "
          f"read {100 * (case.read_fraction or 0):.1f}% of the slots")
    for i, rows in enumerate(tables):
        print(f"\nsparse layer {i}\n| query head | p(digit) | cos(q, k - c) | max cos | P(included) | included | "
              "mass read |\n|---|---:|---:|---:|---:|---|---:|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
