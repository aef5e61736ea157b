"""How the policy search's cost grows with depth and width, and what it would
cost for 7B / 70B / 400B-class models (the reviewer's "time scalability" question).

Measured here: random-initialised Llama-shaped models of several depths L and widths d (weights do not
change the cost), calibrated on N × T random tokens, searched with the fast procedure at a sharing rate
with T = −0.99 (every candidate is accepted, so a search evaluates exactly ``round(rate × L)`` candidates
and the cost per candidate is what is measured; how many candidates a real search needs is a separate
factor, taken from real search traces when given).

Cost model. A candidate ``i → j`` re-runs the decoder from layer ``i`` on: ``layers_computed`` layer
forwards of N × T tokens. One layer forward on one token costs ``flops_per_layer_token`` ≈ 2 × (weights
of one layer) + 4 × T × d (attention scores and mixing). So

    seconds ≈ fixed × candidates + layers_computed × N × T × flops_per_layer_token / throughput

and ``throughput`` (FLOP/s actually achieved) and ``fixed`` (per-candidate overhead) are fitted by least
squares on the measurements. The projection for a target shape multiplies its FLOPs per search by the
fitted CPU throughput, and by an *assumed* GPU throughput (stated in the output), and says how much
memory the model needs to be searched at all (weights + the fast procedure's cached states).
"""

from __future__ import annotations

import logging
import math
import time

from ..models.shapes import SHAPES

log = logging.getLogger("kvsharer")

# Target shapes for the projection: layers, hidden, intermediate, heads, kv heads, vocab
PROJECTED = {name: SHAPES[key].as_tuple() for name, key in [
    ("Llama-2-7B", "llama-2-7b"), ("Llama-2-13B", "llama-2-13b"), ("Llama-2-70B", "llama-2-70b"),
    ("Llama-3.1-405B", "llama-3.1-405b")]}
# Assumed sustained throughput of one H100 on these small batches (N × T = 1,920 tokens), bf16 dense.
# Peak is ~989 TFLOP/s; a prefill-shaped forward of 2k tokens reaches well below it. 40 % is an assumption.
GPU_ASSUMED_FLOPS = 0.4 * 989e12
GPU_MEMORY_BYTES = 80e9


def layer_params(hidden: int, inter: int, heads: int, kv_heads: int) -> int:
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim  # q, o, k, v
    return attn + 3 * hidden * inter  # gate, up, down


def flops_per_layer_token(hidden: int, inter: int, heads: int, kv_heads: int, tokens: int) -> float:
    return 2.0 * layer_params(hidden, inter, heads, kv_heads) + 4.0 * tokens * hidden


def measured_shape(hidden: int) -> tuple[int, int]:
    """(heads, intermediate) of the random model of width ``hidden`` that ``measure`` builds (heads of 64)."""
    return max(1, hidden // 64), int(hidden * 8 / 3) // 64 * 64


MEASURE_VOCAB = 1024
# Assumed fp32 matmul throughput of one CPU thread, for the job's wall-time request only (a lower bound:
# a current core sustains several times more); the measurement itself fits the real throughput.
CPU_FLOPS_PER_THREAD = 10e9
HOST_OVERHEAD_BYTES = 2e9


def measure_memory_bytes(layers: list[int], hiddens: list[int], samples: int, tokens: int) -> float:
    """Host memory the measurement needs (torch-free): its largest random fp32 model, plus every layer's
    cached outputs and K/V for the ``samples x tokens`` calibration tokens (the fast search keeps them),
    plus one forward's activations and logits, plus interpreter overhead."""
    worst = 0.0
    for n_layers in layers:
        for hidden in hiddens:
            heads, inter = measured_shape(hidden)
            params = n_layers * layer_params(hidden, inter, heads, heads) + 2 * MEASURE_VOCAB * hidden
            states = n_layers * samples * tokens * 3 * hidden * 4
            activations = samples * tokens * (inter + 4 * hidden + MEASURE_VOCAB) * 4
            worst = max(worst, params * 4 + states + activations)
    return worst + HOST_OVERHEAD_BYTES


def measure_flops(layers: list[int], hiddens: list[int], samples: int, tokens: int, rate: float) -> float:
    """FLOPs of the whole measurement, an upper bound: per shape four calibration forwards and at most
    ``round(rate x L)`` candidates that each re-run all L layers."""
    total = 0.0
    for n_layers in layers:
        for hidden in hiddens:
            heads, inter = measured_shape(hidden)
            layer_token = flops_per_layer_token(hidden, inter, heads, heads, tokens)
            forwards = 4 + max(1, round(rate * n_layers))
            total += forwards * n_layers * samples * tokens * layer_token
    return total


def measure_minutes(layers: list[int], hiddens: list[int], samples: int, tokens: int, rate: float,
                    threads: int) -> int:
    """Wall-time request (minutes) for the measurement on ``threads`` CPU threads: twice the FLOP estimate at
    ``CPU_FLOPS_PER_THREAD``, plus 10 minutes for building and initialising the models."""
    seconds = measure_flops(layers, hiddens, samples, tokens, rate) / (CPU_FLOPS_PER_THREAD * max(1, threads))
    return math.ceil(2 * seconds / 60) + 10


def measure(layers: list[int], hiddens: list[int], samples: int, tokens: int, rate: float, seed: int = 0) -> list[dict]:
    """Time the fast search on random Llama-shaped models of every (L, d)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..search.calibrate import collect  # its forward also warms up the kernels before the search is timed
    from ..search.greedy import SearchSettings, run_search, target_layers

    rows = []
    for n_layers in layers:
        for hidden in hiddens:
            heads, inter = measured_shape(hidden)
            config = LlamaConfig(vocab_size=MEASURE_VOCAB, hidden_size=hidden, intermediate_size=inter,
                                 num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                                 max_position_embeddings=max(512, tokens))
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).eval()
            ids = torch.randint(0, MEASURE_VOCAB, (samples, tokens), generator=torch.Generator().manual_seed(seed))
            stats = collect(model, ids)
            for _ in range(3):  # warm up: the first forwards of a new shape build kernels and caches
                collect(model, ids)
            target = target_layers(n_layers, rate=rate)
            settings = SearchSettings(target=target, threshold=-0.99, procedure="fast")
            start = time.perf_counter()
            result = run_search(model, stats, settings, progress=False)
            seconds = time.perf_counter() - start
            row = {
                "layers": n_layers, "hidden": hidden, "intermediate": inter, "heads": heads,
                "samples": samples, "tokens": tokens, "rate": rate, "candidates": result["candidates_evaluated"],
                "layers_computed": result["layers_computed"] // samples, "seconds": seconds,
                "flops_per_layer_token": flops_per_layer_token(hidden, inter, heads, heads, tokens),
            }
            rows.append(row)
            log.info("L=%d d=%d: %d candidates, %d layer forwards, %.2f s", n_layers, hidden, row["candidates"],
                     row["layers_computed"], seconds)
    return rows


def fit(rows: list[dict]) -> dict:
    """Least squares (in relative error) of seconds = fixed × candidates + flops / throughput."""
    import numpy as np

    a = np.array([[r["candidates"], r["layers_computed"] * r["samples"] * r["tokens"] * r["flops_per_layer_token"]]
                  for r in rows], dtype=float)
    y = np.array([r["seconds"] for r in rows], dtype=float)
    scale = a.max(axis=0)
    # relative errors (rows divided by the measured seconds): small and large searches weigh alike
    coef, *_ = np.linalg.lstsq(a / scale / y[:, None], np.ones_like(y), rcond=None)
    coef = np.clip(coef / scale, 1e-30, None)
    predicted = a @ coef
    r2 = 1 - ((y - predicted) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    return {"fixed_seconds_per_candidate": float(coef[0]), "throughput_flops": float(1 / coef[1]), "r2": float(r2),
            "predicted_seconds": predicted.tolist()}


def candidate_factors(policies: list[dict]) -> dict:
    """From real search traces: candidates per shared layer and the share of the depth a candidate re-runs."""
    per_layer, depth_share = [], []
    for p in policies:
        n = p["n_layers"]
        if p.get("num_shared"):
            per_layer.append(p["candidates_evaluated"] / p["num_shared"])
        depth_share += [(n - t["pair"][0]) / n for t in p["trace"]]
    return {
        "candidates_per_shared_layer": sum(per_layer) / len(per_layer) if per_layer else 1.0,
        "depth_share_per_candidate": sum(depth_share) / len(depth_share) if depth_share else 0.5,
        "policies": len(policies),
    }


def project(fitted: dict, factors: dict, samples: int, tokens: int, rate: float) -> list[dict]:
    out = []
    for name, (n_layers, hidden, inter, heads, kv_heads, vocab) in PROJECTED.items():
        target = round(rate * n_layers)
        candidates = target * factors["candidates_per_shared_layer"]
        worst = n_layers * (n_layers - 1) / 2  # every pair tried
        layer_token = flops_per_layer_token(hidden, inter, heads, kv_heads, tokens)
        per_candidate = factors["depth_share_per_candidate"] * n_layers * samples * tokens * layer_token
        # the authors' procedure: per sample, a full reference and a full candidate forward, with LM head
        official = 2 * samples * tokens * (n_layers * layer_token + 2 * vocab * hidden)
        params = n_layers * layer_params(hidden, inter, heads, kv_heads) + 2 * vocab * hidden
        head_dim = hidden // heads
        cached = n_layers * samples * tokens * (hidden + 2 * kv_heads * head_dim) * 2  # bf16 outputs + K/V
        memory = params * 2 + cached
        out.append({
            "model": name, "layers": n_layers, "hidden": hidden, "params": params, "target": target,
            "candidates_expected": candidates, "candidates_worst": worst,
            "flops_per_candidate": per_candidate, "flops_per_candidate_official": official,
            "cpu_seconds_expected": candidates * (per_candidate / fitted["throughput_flops"] + fitted["fixed_seconds_per_candidate"]),
            "gpu_seconds_expected": candidates * per_candidate / GPU_ASSUMED_FLOPS,
            "gpu_seconds_worst": worst * per_candidate / GPU_ASSUMED_FLOPS,
            "gpu_seconds_official_expected": candidates * official / GPU_ASSUMED_FLOPS,
            "memory_bytes": memory, "gpus_needed": int(-(-memory // GPU_MEMORY_BYTES)),
        })
    return out
