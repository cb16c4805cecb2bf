"""Independent float64 references for end-to-end checks on a Llama model.

Queries/keys/values of every layer are recomputed from the hidden states a
plain (uncompressed) forward returns, with the model's own modules, so the
compressed cache can be checked against a selection made from scratch.
"""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@torch.no_grad()
def layer_qkv(model, input_ids, attention_mask=None):
    """Return a list over layers of (q [B,Hq,T,D], k [B,Hkv,T,D], v) in float64."""
    out = model(input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    cfg = model.config
    B, T = input_ids.shape
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        position_ids = torch.arange(T)[None].expand(B, T)
    res = []
    for li, layer in enumerate(model.model.layers):
        h = layer.input_layernorm(out.hidden_states[li])
        attn = layer.self_attn
        D = attn.head_dim
        q = attn.q_proj(h).view(B, T, -1, D).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, -1, D).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        res.append((q.double(), k.double(), v.double()))
    assert len(res) == cfg.num_hidden_layers
    return res


def window_attention64(q, k, kv_start=None):
    """Mean over the given queries (the last ones) of causal softmax attention,
    per query head: [B, Hq, Tk] float64."""
    B, Hq, Tq, D = q.shape
    g = Hq // k.shape[1]
    Tk = k.shape[2]
    kk = k.repeat_interleave(g, 1)
    logits = q @ kk.transpose(-1, -2) / D ** 0.5
    j = torch.arange(Tk)
    pos = torch.arange(Tq) + Tk - Tq
    allowed = (j[None, :] <= pos[:, None])[None, None]
    if kv_start is not None:
        allowed = allowed & (j >= kv_start[:, None])[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0).mean(2)


def group_mean(scores, hkv):
    B, Hq, T = scores.shape
    return scores.view(B, hkv, Hq // hkv, T).mean(2)


def assert_topk_consistent(kept, scores, forced, k, eps=1e-6):
    """``kept`` [n] indices chosen by the library for one head. Check they are
    the forced ones plus a top-(k - |forced|) set of ``scores`` [T], allowing
    swaps only between near-ties."""
    kept = set(int(i) for i in kept)
    forced = set(int(i) for i in forced)
    assert len(kept) == k, f"kept {len(kept)} slots, expected {k}"
    assert forced <= kept, f"forced slots {sorted(forced - kept)} were evicted"
    rest = [i for i in range(len(scores)) if i not in forced]
    n_free = k - len(forced)
    if n_free <= 0 or not rest:
        return
    ordered = sorted(rest, key=lambda i: -float(scores[i]))
    threshold = float(scores[ordered[n_free - 1]])
    for i in rest:
        s = float(scores[i])
        if i in kept:
            assert s >= threshold - eps, f"slot {i} kept with score {s} < threshold {threshold}"
        else:
            assert s <= threshold + eps, f"slot {i} evicted with score {s} > threshold {threshold}"


def accumulate_h2o(acc, q, k, pos, scaling):
    """Add, in float64, the attention column sums of queries ``q`` ``[Hq, nq, D]``
    (the last ``nq`` key positions, causal) over keys ``k`` ``[H, n, D]`` to
    ``acc`` (one dict per kv head: token position -> accumulated attention,
    ``pos`` ``[H, n]`` the slots' positions), the GQA group's mean per kv head."""
    H, n = k.shape[0], k.shape[1]
    Hq, nq = q.shape[0], q.shape[1]
    g = Hq // H
    logits = q.double() @ k.double().repeat_interleave(g, 0).transpose(-1, -2) * scaling
    causal = torch.arange(n)[None, :] <= (torch.arange(nq) + n - nq)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    col = probs.view(H, g, nq, n).mean(1).sum(1)
    for h in range(H):
        for j, p in enumerate(pos[h].tolist()):
            acc[h][p] = acc[h].get(p, 0.0) + float(col[h, j])


def assert_h2o_kept(acc_h, held, kept, recent_share=0.5, eps=1e-6):
    """One kv head's H2O re-compression: of the ``held`` positions it kept
    ``kept`` (positions), the most recent ``recent_share`` of them plus the
    top of the accumulation ``acc_h`` (position -> score)."""
    keep = len(kept)
    recent = int(round(keep * recent_share))
    scores = torch.tensor([acc_h[p] for p in held], dtype=torch.float64)
    slots = [held.index(p) for p in kept]
    assert_topk_consistent(slots, scores, range(len(held) - recent, len(held)), keep, eps=eps)
