"""Worker for tests/test_tp.py, run under ``torchrun --nproc-per-node N``.

``python tp_worker.py MODEL_FOLDER OUT_PREFIX SPEC[,SPEC...]``: loads the
model with transformers' tensor-parallel plan ("auto": q/k/v column-wise, so
each rank holds num_key_value_heads / N kv heads), runs greedy generate()
on the prompt saved next to it (MODEL_FOLDER/prompt.pt) for each method
spec (``name[:opt=value...]@budget``, or ``full``) and writes
OUT_PREFIX.rank<R>.json with the tokens and each layer's kept slots per head.
"""

import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def _load(folder):
    from transformers import AutoModelForCausalLM

    try:
        from transformers import DistributedConfig
    except ImportError:  # transformers without DistributedConfig takes tp_plan directly
        return AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32, use_kernels=False)
    return AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_plan="auto"),
                                                dtype=torch.float32, use_kernels=False)


def main(folder, prefix, specs):
    import kvcompress as kvc
    from kvcompress.methods import method_from_spec

    start = time.time()
    rank = int(os.environ.get("RANK", 0))
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        # our own group (gloo on CPU) with a short timeout, so a stuck rank fails instead of waiting 30 min
        backend = "gloo" if not torch.cuda.is_available() else "nccl"
        dist.init_process_group(backend, timeout=timedelta(seconds=90))
    result = {"rank": rank}
    try:
        model = _load(folder).eval()
        result["world"] = dist.get_world_size() if dist.is_initialized() else 1
        result["load_s"] = time.time() - start
        prompt = torch.load(os.path.join(folder, "prompt.pt"))
        for spec in specs:
            name, _, budget = spec.partition("@")
            kw = dict(input_ids=prompt["ids"], attention_mask=prompt["mask"], max_new_tokens=prompt["new"],
                      min_new_tokens=prompt["new"], do_sample=False, pad_token_id=prompt["pad"])
            with torch.no_grad():
                if name == "full":
                    out, lengths = model.generate(**kw), None
                else:
                    with kvc.compress(model, method_from_spec(name, budget=int(budget))) as session:
                        out = model.generate(**kw)
                    lengths = [layer.head_lengths() for layer in session.cache.layers]
            result[spec] = {"tokens": out.tolist(), "head_lengths": lengths}
    except Exception:  # noqa: BLE001 - reported to the test through the file
        result["error"] = traceback.format_exc()
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3].split(",")))
