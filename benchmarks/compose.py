"""Plain vs KV sharing vs a token-level method vs both, side by side in one run: KV bytes and decode speed.

    python benchmarks/compose.py --model results/models/smollm2-135m --batch 4 --prompt-tokens 512 --new-tokens 64

Four arms on the same model and the same random prompt (batch B × P tokens, no padding):

* ``plain``   — the unmodified model (SDPA attention);
* ``sharing`` — KV sharing at ``--rate`` (default 25 %), the spread policy of ``sharing_cost.py``;
* ``h2o``     — token-level compression ``--method`` (default H2O) at ``--budget`` (default 50 % kept);
* ``both``    — sharing and compression together (a source and its sharers form one compressed cache).

Each arm runs ``generate`` greedily for N new tokens (``min_new_tokens = N``, so all arms decode the
same number of steps). Decode throughput is ``B × (N − 1) / decode time``, where decode time runs from
the first to the last call of a logits processor (i.e. it excludes the prefill); the median of
``--repeats`` interleaved repeats is reported (after one warm-up per arm). KV bytes are those the cache
really holds at the end of generation (``kvsharer.cache_nbytes``). Ratios are arm / plain. Writes JSON.

Note: compressed arms compute attention with a blockwise fp32 function that also scores tokens (SDPA
returns no attention weights; :mod:`kvsharer.methods.intra.blockwise`), so their speed includes that scoring cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharing_cost import spread_policy  # noqa: E402

from kvsharer import cache_nbytes, share_kv  # noqa: E402
from kvsharer.atomic import atomic_write_text  # noqa: E402
from kvsharer.methods.intra import compress_kv, make_method  # noqa: E402
from kvsharer.models.loading import find_parts, load_model  # noqa: E402
from run_facts import run_facts  # noqa: E402

ARMS = ("plain", "sharing", "h2o", "both")


class StepClock(LogitsProcessor):
    """Records the time of every decoding step (generate calls processors once per new token)."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def run_arm(model, arm: str, tokens, args, policy) -> dict:
    contexts = {
        "plain": lambda: _null(),
        "sharing": lambda: share_kv(model, policy),
        "h2o": lambda: compress_kv(model, make_method(args.method, args.budget)),
        "both": lambda: compress_kv(model, make_method(args.method, args.budget), policy=policy),
    }
    clock = StepClock(args.device)
    with contexts[arm](), torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True,
        )
        total = time.perf_counter() - start
    cache = out.past_key_values
    stored = [None if getattr(layer, "keys", None) is None else int(layer.keys.shape[-2]) for layer in cache.layers]
    decode_s = clock.times[-1] - clock.times[0]
    return {
        "kv_bytes": cache_nbytes(cache),
        "stored_tokens_per_layer": stored,
        "seen_tokens": cache.get_seq_length(),
        "state_bytes": sum(layer.state_nbytes() for layer in cache.layers if hasattr(layer, "state_nbytes")),
        "decode_s": decode_s,
        "prefill_s": clock.times[0] - start,
        "generate_s": total,
        "decode_tokens_per_s": tokens.shape[0] * (args.new_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
    }


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    launched = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="results/models/smollm2-135m")
    parser.add_argument("--rate", type=float, default=0.25, help="fraction of layers that share (spread policy)")
    parser.add_argument("--method", default="h2o", help="token-level method (kvsharer.methods.intra.METHODS)")
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of tokens each cache keeps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="results/benchmarks/compose.json")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed needs two steps)")
    if not Path(args.model).is_dir():
        parser.error(f"model folder {args.model} does not exist (prepare it with `python -m kvsharer prepare-model`)")

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    n_layers = find_parts(model).n_layers
    policy = spread_policy(model, args.rate)
    make_method(args.method, args.budget)  # validate before any compute
    vocab = model.config.vocab_size
    tokens = torch.randint(3, vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)

    for arm in ARMS:  # warm-up
        run_arm(model, arm, tokens, args, policy)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):  # interleaved, so drift hits every arm alike
        for arm in ARMS:
            runs[arm].append(run_arm(model, arm, tokens, args, policy))

    arms = {}
    for arm in ARMS:
        last = runs[arm][-1]
        arms[arm] = {
            "kv_bytes": last["kv_bytes"],
            "state_bytes": last["state_bytes"],
            "seen_tokens": last["seen_tokens"],
            "stored_tokens_per_layer": last["stored_tokens_per_layer"],
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs[arm]),
            "prefill_s_median": statistics.median(r["prefill_s"] for r in runs[arm]),
            "generate_s_median": statistics.median(r["generate_s"] for r in runs[arm]),
            "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs[arm]],
        }
    plain = arms["plain"]
    for arm in ARMS:
        arms[arm]["kv_bytes_ratio"] = arms[arm]["kv_bytes"] / plain["kv_bytes"]
        arms[arm]["decode_speed_ratio"] = arms[arm]["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
    result = {
        "benchmark": "compose",
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_layers": n_layers,
        "shared_layers": policy.shared_layers,
        "rate_effective": policy.rate,
        "method": args.method,
        "budget": args.budget,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "arms": arms,
        **run_facts(launched, argv),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{n_layers} layers ({policy.num_shared} shared), {args.method} budget {args.budget:g}, batch {args.batch} x "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens on {args.device}, median of {args.repeats}:")
    print(f"  {'arm':8s} {'KV bytes':>14s} {'ratio':>7s} {'decode tok/s':>13s} {'ratio':>7s}")
    for arm in ARMS:
        a = arms[arm]
        print(f"  {arm:8s} {a['kv_bytes']:>14,d} {a['kv_bytes_ratio']:>7.4f} {a['decode_tokens_per_s']:>13.1f} "
              f"{a['decode_speed_ratio']:>7.3f}")
    print(f"  written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
