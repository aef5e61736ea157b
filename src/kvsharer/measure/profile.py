"""What a sharing rate (with or without a cache method) does to memory and speed (stage ``profile``).

For every sharing rate (a spread policy: the cost depends on how many layers share, not which), every
cache method (``none``, a token method ``h2o:0.5``, quantization ``int4``, the ``minicache:0.25`` baseline
at rate 0 only; see :mod:`kvsharer.cache.compose`), batch size and context length:

* ``kv_bytes``      K/V bytes the cache really holds after prefill + decoding (``cache_nbytes``)
* ``expected_kv_bytes`` the same from the model shape: 2 × stored layers × batch × kv_heads × tokens × head_dim × bytes
                    (times the budget for a token method; codes + scales for quantization; empty for
                    MiniCache, whose retained tokens depend on the data) — the answer to "why memory saved exceeds the
                    rate": the K/V part falls exactly by the rate, the total by rate × (KV share of memory)
* ``peak_bytes``    peak memory of one prefill + decoding run, measured (:mod:`kvsharer.measure.peakmem`), the largest
                    over ``--repeats``: GPU: ``torch.cuda.max_memory_allocated`` over the run (everything
                    allocated, weights included), summed over the GPUs a model spread with ``--gpus N`` holds;
                    CPU: weights + the growth of the process' resident set at its peak within the run over
                    its size just before (activations, K/V, buffers)
* ``peak_method``   how ``peak_bytes`` was measured: ``cuda_allocator``, ``rss_hwm`` (Linux: VmHWM reset
                    through /proc/self/clear_refs) or ``rss_sampled`` (RSS polled every millisecond)
* ``process_peak_rss`` the process' peak RSS since it started (``getrusage``; it never goes down)
* ``prefill_s``     one prefill of ``batch × context`` tokens (median of ``--repeats``)
* ``decode_tok_s``  greedy decoding of ``--new-tokens`` tokens after it: batch × new tokens / seconds
* rows with ``kind = max_batch``: the largest batch whose weights + K/V + activations fit ``--memory-gb``
  (from the shape), measured there when it is at most ``--max-measured-batch``;
* a point that runs out of GPU memory is kept as an empty row of kind ``grid_oom`` / ``max_batch_oom``.
"""

from __future__ import annotations

import csv
import io
import logging
import resource
import statistics
import time

from .peakmem import PeakMemory

log = logging.getLogger("kvsharer")

COLUMNS = ["model", "rate", "intra", "budget", "batch", "context", "kv_bytes", "peak_bytes", "prefill_s",
           "decode_tok_s", "kind", "shared_layers", "expected_kv_bytes", "weights_bytes", "process_peak_rss",
           "device", "cache", "cache_family", "peak_method"]


def parse_methods(text: str) -> list:
    """``none,h2o:0.5,int4,minicache:0.25`` -> [None, CacheMethod(h2o 0.5), ...] (see kvsharer.cache.compose)."""
    from ..cache.compose import CacheMethod

    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError("--cache names nothing")
    return [CacheMethod.parse(item) for item in items]


def method_columns(method) -> dict:
    """CSV columns of a cache method: ``intra`` (the method's name, ``none``), ``budget`` (its number: kept
    fraction or tokens, bits, MiniCache rate), ``cache`` (its spec) and ``cache_family``."""
    if method is None:
        return {"intra": "none", "budget": None, "cache": "none", "cache_family": "none"}
    return {"intra": method.name, "budget": method.value, "cache": method.spec, "cache_family": method.family}


def gpus_of(model) -> list:
    """The CUDA devices holding the model: every GPU of a model spread with device_map (``hf_device_map``),
    else its one device (none on CPU)."""
    import torch

    placed = {d for d in (getattr(model, "hf_device_map", None) or {}).values() if isinstance(d, int)}
    if placed:
        return [torch.device("cuda", d) for d in sorted(placed)]
    return [model.device] if model.device.type == "cuda" else []


def _sync(devices) -> None:
    import torch

    for device in devices:
        torch.cuda.synchronize(device)


def run_once(model, policy, method, batch: int, context: int, new_tokens: int, seed: int = 0) -> dict:
    """One prefill + greedy decode under ``policy`` and cache ``method``; returns bytes, measured peak
    memory (``peak_bytes``: see the module docstring) and timings."""
    import contextlib

    import torch
    from transformers import DynamicCache

    from ..cache.compose import apply_setting
    from ..cache.sharing import cache_nbytes

    device = model.device
    gpus = gpus_of(model)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(seed)).to(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(apply_setting(model, policy, method))
        with PeakMemory(device, gpus) as peak:
            cache = DynamicCache(config=model.config)
            _sync(gpus)
            start = time.perf_counter()
            out = model(prompt, past_key_values=cache, use_cache=True)
            _sync(gpus)
            prefill = time.perf_counter() - start
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens):  # greedy decoding, one token per step, no sampling overhead
                out = model(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            _sync(gpus)
            decode = time.perf_counter() - start
        kv = cache_nbytes(cache)
    if peak.method == "cuda_allocator":  # the allocator's peak holds the weights already
        peak_bytes = peak.peak
    else:  # the resident set before the run held the weights (and Python, libraries): add the run's growth
        peak_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + peak.extra
    return {"prefill_s": prefill, "decode_tok_s": batch * new_tokens / decode if new_tokens else None,
            "kv_bytes": kv, "peak_bytes": peak_bytes, "peak_method": peak.method}


def expected_bytes(model, policy, method, batch: int, tokens: int) -> int | None:
    """K/V bytes from the model shape alone (None where a method's size depends on the data: MiniCache's
    retained tokens)."""
    from ..cache.sharing import expected_kv_nbytes

    element = model.dtype.itemsize
    if method is not None and method.family == "quant":
        from ..methods.quant import expected_quant_nbytes, quant_group_size

        return expected_quant_nbytes(model, policy, batch, tokens, bits=int(method.value),
                                     group_size=quant_group_size(model), dtype_bytes=element)
    if method is not None and method.family == "minicache":
        return None
    if method is not None:  # a budget keeps round-half-up(fraction × seen) tokens, or a fixed count
        budget = method.value
        tokens = min(tokens, max(1, int(budget * tokens + 0.5)) if isinstance(budget, float) else int(budget))
    # (PyramidInfer spreads the same total over the layers unevenly: the layer-mean is what is predicted)
    return expected_kv_nbytes(model, policy, batch, tokens, element)


def max_batch(model, policy, method, context: int, new_tokens: int, memory_bytes: float, weights: int) -> int:
    """Largest batch whose weights + K/V (+ a prefill activation allowance) fit ``memory_bytes``."""
    hidden = model.config.hidden_size
    per_seq_kv = expected_bytes(model, policy, method, 1, context + new_tokens)
    if per_seq_kv is None:  # measured: one sequence's cache
        per_seq_kv = run_once(model, policy, method, 1, context, new_tokens)["kv_bytes"]
    # activations of one prefill: a few [context, hidden] tensors and one [context, vocab] logits row set
    per_seq_act = context * (8 * hidden + model.config.vocab_size) * model.dtype.itemsize
    free = memory_bytes - weights
    return max(0, int(free // (per_seq_kv + per_seq_act)))


def profile(model, name: str, rates: list[float], methods, batches: list[int], contexts: list[int], new_tokens: int,
            repeats: int, memory_gb: float | None, max_measured_batch: int) -> list[dict]:
    import torch
    from tqdm import tqdm

    from ..models.loading import find_parts
    from ..cache.policy import SharingPolicy

    parts = find_parts(model)
    n_layers = parts.n_layers
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # a rival of sharing (MiniCache), not an add-on: profiled at rate 0 only
    settings = [(r, m) for r in rates for m in methods if not (m is not None and not m.with_sharing and r > 0)]
    grid = [(r, m, b, c) for r, m in settings for b in batches for c in contexts]
    if memory_gb:
        grid += [(r, m, None, c) for r, m in settings for c in contexts]
    rows = []
    run_once(model, SharingPolicy.identity(n_layers), None, 1, min(contexts), 2)  # warm-up
    for rate, method, batch, context in tqdm(grid, desc="profile", unit="config"):
        policy = SharingPolicy.spread(n_layers, rate, parts.kinds)
        kind = "grid"
        if batch is None:
            kind = "max_batch"
            batch = max_batch(model, policy, method, context, new_tokens, memory_gb * 1e9, weights)
        row = {"model": name, "rate": rate, **method_columns(method), "batch": batch,
               "context": context, "kind": kind, "shared_layers": policy.num_shared, "weights_bytes": weights,
               "expected_kv_bytes": expected_bytes(model, policy, method, batch, context + new_tokens),
               "device": str(model.device)}
        if batch == 0 or (kind == "max_batch" and batch > max_measured_batch):
            rows.append({**row, "kv_bytes": None, "peak_bytes": None, "prefill_s": None, "decode_tok_s": None,
                         "process_peak_rss": None, "peak_method": None})
            continue
        try:
            runs = [run_once(model, policy, method, batch, context, new_tokens, seed=k) for k in range(repeats)]
        except torch.OutOfMemoryError:  # a GPU grid point that does not fit: an empty row, not a crash
            torch.cuda.empty_cache()
            log.warning("out of memory at rate %g, cache %s, batch %d, context %d: row left empty", rate,
                        row["cache"], batch, context)
            rows.append({**row, "kind": f"{kind}_oom", "kv_bytes": None, "peak_bytes": None, "prefill_s": None,
                         "decode_tok_s": None, "process_peak_rss": None, "peak_method": None})
            continue
        rows.append({
            **row, "kv_bytes": runs[-1]["kv_bytes"],
            "peak_bytes": max(r["peak_bytes"] for r in runs), "peak_method": runs[-1]["peak_method"],
            "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs) if new_tokens else None,
            "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })
    return rows


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return buffer.getvalue()
