"""Plain vLLM and vLLM serving sharing policies at one fixed KV-cache budget: KV blocks, concurrency, tokens/s.

The measurement behind the DAG's stage (``python -m kvsharer serving``, :mod:`kvsharer.stages.serving`) and
``benchmarks/serve.py``:

* :class:`Workload`: the request set and engine settings every arm shares (``requests`` prompts of
  ``prompt_tokens`` random token ids, ``new_tokens`` greedy tokens each, EOS ignored, all submitted at once);
* :func:`expected_blocks`, :func:`max_concurrency` (vLLM-free): what a budget holds, from the model's
  ``config.json`` alone — ``budget // (block bytes per layer x layers that store K/V)`` blocks, and the requests
  of the set that fit at their full length (``blocks // ceil((prompt + new) / block_size)``, at most
  ``max_num_seqs``). Uniform attention only: vLLM sizes sliding-window layers' blocks apart;
* :func:`measure_arms`: one vLLM engine per :class:`Arm` at the budget (``kv_cache_memory_bytes``), a
  warm-up request, then ``repeats`` rounds of the set through every engine in turn, a different one first each
  round (arms side by side in time: a load change on the machine hits all of them), or one engine after the
  other (``interleave=False``: engines too large to hold together, a 7B model on one GPU); per arm the blocks
  vLLM allocated, the medians over the rounds and the ratios to ``plain`` (:func:`summarize`).

vLLM is imported inside the functions that run it, so the arithmetic imports anywhere (the main environment's
tests); ``set_engine_threads`` must run before vLLM is first imported.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..cache.policy import SharingPolicy

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # model dtype -> bytes of one K or V element
FP8 = "fp8"  # kv_cache_dtype: one byte per element, whatever the model's dtype
TIMED = ("output_tokens_per_s", "latency_mean_s", "latency_p50_s", "latency_p90_s", "ttft_mean_s",
         "max_running_observed")
RATIOS = ("kv_blocks", "max_concurrency", "max_running_observed", "output_tokens_per_s", "latency_mean_s",
          "ttft_mean_s")


@dataclass(frozen=True)
class Workload:
    """The request set and the engine settings of every arm."""

    block_size: int = 32
    requests: int = 48
    prompt_tokens: int = 32
    new_tokens: int = 64
    max_num_seqs: int = 256
    repeats: int = 2
    dtype: str = "float32"
    eager: bool = True  # no torch.compile / CUDA graphs (CPU: no compile wait)
    load_format: str = "auto"  # dummy: random weights from config.json alone, no tokenizer
    tensor_parallel_size: int = 1
    seed: int = 0

    def problems(self) -> list[str]:
        """Every setting out of range (empty: fine)."""
        out = [f"{name} must be at least 1, got {getattr(self, name)}"
               for name in ("block_size", "requests", "prompt_tokens", "new_tokens", "max_num_seqs", "repeats",
                            "tensor_parallel_size") if getattr(self, name) < 1]
        if self.dtype not in ELEMENT_BYTES:
            out.append(f"dtype {self.dtype!r} is not one of {', '.join(ELEMENT_BYTES)}")
        return out

    @property
    def max_model_len(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def blocks_per_request(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)


@dataclass(frozen=True)
class Arm:
    """One engine of a run: a policy (identity: plain vLLM) and its KV-cache dtype (``auto``: the model's)."""

    name: str
    policy: SharingPolicy
    overrides: dict  # serving_overrides(model, policy): {} for plain vLLM
    kv_cache_dtype: str = "auto"
    required: bool = True  # False: a failed build is recorded as the arm's error, the run goes on (fp8)


def kv_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """``(decoder layers, KV heads, head size)`` of a model's ``config.json``."""
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], config.get("num_key_value_heads") or heads, head_dim


def block_bytes_per_layer(config: dict[str, Any], block_size: int, dtype: str, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one block of one layer: ``block_size`` tokens x K and V x KV heads x head size x element."""
    _, kv_heads, head_dim = kv_shape(config)
    element = 1 if kv_cache_dtype == FP8 else ELEMENT_BYTES[dtype]
    return block_size * 2 * kv_heads * head_dim * element


def expected_blocks(config: dict[str, Any], budget_bytes: int, storing_layers: int, block_size: int, dtype: str,
                    kv_cache_dtype: str = "auto") -> int:
    """The blocks ``budget_bytes`` hold when ``storing_layers`` layers store K/V (the others read theirs)."""
    return budget_bytes // (block_bytes_per_layer(config, block_size, dtype, kv_cache_dtype) * storing_layers)


def max_concurrency(blocks: int, workload: Workload) -> int:
    """Requests of the set that fit in ``blocks`` at their full length at once (at most ``max_num_seqs``)."""
    return min(blocks // workload.blocks_per_request, workload.max_num_seqs)


def random_prompts(vocab_size: int, workload: Workload) -> list[list[int]]:
    """``requests`` prompts of ``prompt_tokens`` token ids drawn from ``[100, vocab_size)`` (seeded)."""
    import numpy as np

    rng = np.random.default_rng(workload.seed)
    return [rng.integers(100, vocab_size, workload.prompt_tokens).tolist() for _ in range(workload.requests)]


def set_engine_threads(threads: int) -> None:
    """CPU threads of the engines (``OMP_NUM_THREADS``, no core binding): before vLLM is first imported."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def vllm_version() -> str:
    import vllm

    return vllm.__version__


# ---------------------------------------------------------------- running vLLM


def build_engine(model: str, arm: Arm, budget_bytes: int, workload: Workload):
    """One engine at the fixed budget: ``(LLM, KV blocks vLLM allocated, seconds to build)``."""
    from vllm import LLM

    from .vllm_plugin import register

    register()
    started = time.perf_counter()
    llm = LLM(model=model, dtype=workload.dtype, enforce_eager=workload.eager, seed=workload.seed,
              load_format=workload.load_format, skip_tokenizer_init=workload.load_format == "dummy",
              max_model_len=workload.max_model_len, block_size=workload.block_size,
              max_num_seqs=workload.max_num_seqs, kv_cache_memory_bytes=budget_bytes,
              kv_cache_dtype=arm.kv_cache_dtype, hf_overrides=arm.overrides,
              tensor_parallel_size=workload.tensor_parallel_size, disable_log_stats=True)
    return llm, llm.llm_engine.vllm_config.cache_config.num_gpu_blocks, time.perf_counter() - started


def sampling_params(workload: Workload):
    """Greedy, exactly ``new_tokens`` tokens (EOS ignored), no detokenizing, new tokens only per step."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(temperature=0.0, max_tokens=workload.new_tokens, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


def run_set(llm, params, prompts: list[list[int]], tag: str) -> dict:
    """The whole request set through ``llm``'s engine, all submitted at once: tokens/s and latencies."""
    engine = llm.llm_engine
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    first, done, tokens, running = {}, {}, 0, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        stepping = 0
        for out in outs:
            new = len(out.outputs[0].token_ids) if out.outputs else 0
            if new:
                stepping += 1
                tokens += new
                first.setdefault(out.request_id, now - t0)
            if out.finished:
                done[out.request_id] = now - t0
        running = max(running, stepping)
    wall = time.perf_counter() - t0
    latencies = sorted(done.values())
    return {
        "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
        "latency_mean_s": statistics.fmean(latencies), "latency_p50_s": latencies[len(latencies) // 2],
        "latency_p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        "ttft_mean_s": statistics.fmean(first.values()), "max_running_observed": running,
        "requests_finished": len(done),
    }


def run_rounds(engines: dict, keys: list[str], results: dict, params, prompts: list[list[int]], repeats: int,
               log: Callable[[str], None]) -> None:
    """``repeats`` rounds of the request set through every engine of ``keys``, a different one first each round."""
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            one = run_set(engines[key], params, prompts, f"{key}-{r}")
            results[key]["rounds"].append(one)
            log(f"  round {r + 1} {key}: {one['output_tokens_per_s']:.1f} tok/s, latency {one['latency_mean_s']:.2f} s")


def measure_arms(model: str, config: dict[str, Any], arms: list[Arm], budget_bytes: int, workload: Workload,
                 interleave: bool = True, log: Callable[[str], None] = print) -> dict[str, dict]:
    """``{arm name: result}`` of every arm at ``budget_bytes`` (see the module docstring); the first arm is the
    reference of the ratios (plain vLLM). A required arm whose engine fails raises; another is recorded with
    its ``error``."""
    layers = kv_shape(config)[0]
    prompts = random_prompts(config.get("text_config", config)["vocab_size"], workload)
    params = sampling_params(workload)
    results: dict[str, dict] = {}
    engines: dict = {}
    for arm in arms:
        log(f"arm {arm.name}: {arm.policy.num_shared} of {layers} layers share, KV cache {arm.kv_cache_dtype}, "
            f"budget {budget_bytes / 2**20:g} MiB")
        try:
            llm, blocks, load = build_engine(model, arm, budget_bytes, workload)
        except Exception as err:  # noqa: BLE001  an optional arm this build cannot run is reported, not fatal
            if arm.required:
                raise
            results[arm.name] = {"kv_cache_dtype": arm.kv_cache_dtype, "error": f"{type(err).__name__}: {err}"}
            log(f"  {arm.name} failed: {results[arm.name]['error']}")
            continue
        storing = layers - arm.policy.num_shared
        results[arm.name] = {
            "kv_cache_dtype": arm.kv_cache_dtype, "kv_blocks": blocks, "block_size": workload.block_size,
            "kv_blocks_expected": expected_blocks(config, budget_bytes, storing, workload.block_size,
                                                  workload.dtype, arm.kv_cache_dtype),
            "max_concurrency": max_concurrency(blocks, workload),
            "shared_layers": arm.policy.num_shared, "storing_layers": storing, "map": arm.policy.map,
            "load_s": load, "rounds": [],
        }
        run_set(llm, params, prompts[:1], f"{arm.name}-warmup")  # first-call allocations, not timed
        engines[arm.name] = llm
        if not interleave:  # every round now, then free the engine before the next one is built
            run_rounds(engines, [arm.name], results, params, prompts, workload.repeats, log)
            del engines[arm.name], llm
            gc.collect()
        log(f"  blocks {blocks} (expected {results[arm.name]['kv_blocks_expected']}), "
            f"concurrency {results[arm.name]['max_concurrency']}")
    if interleave:
        run_rounds(engines, list(engines), results, params, prompts, workload.repeats, log)
    engines.clear()
    gc.collect()
    return summarize(results, arms[0].name, layers, workload.dtype)


def summarize(results: dict[str, dict], plain: str, layers: int, dtype: str) -> dict[str, dict]:
    """Per measured arm: the medians of its rounds, its ratios to ``plain`` (the median tokens/s ratio within a
    round too: both ran in the same round) and the ratio the model predicts for its blocks
    (``L / (L - k)``, times the model's bytes per element for an fp8 cache). ``plain`` has the model's KV dtype."""
    measured = {key: arm for key, arm in results.items() if "error" not in arm}
    for arm in measured.values():
        for metric in TIMED:
            arm[metric] = statistics.median(one[metric] for one in arm["rounds"])
    base = measured[plain]
    for arm in measured.values():
        by_round = [one["output_tokens_per_s"] / ref["output_tokens_per_s"]
                    for one, ref in zip(arm["rounds"], base["rounds"])]
        arm["tokens_per_s_ratio_by_round"] = by_round
        arm["ratio_to_plain"] = {m: arm[m] / base[m] for m in RATIOS}
        arm["ratio_to_plain"]["output_tokens_per_s_within_rounds_median"] = statistics.median(by_round)
        element = ELEMENT_BYTES[dtype] if arm["kv_cache_dtype"] == FP8 else 1  # fp8: one byte per element
        arm["expected_ratio"] = layers / arm["storing_layers"] * element
    return results
