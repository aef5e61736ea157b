"""What every cache method does to a model, recorded: ``tests/data/cache_method_reference.json``.

For tiny random-initialised models (from configs in memory, fixed seeds) and every ``--cache`` spec, alone
and with a sharing policy (where the method composes with sharing), a setting is attached the way the
evaluation attaches it (``kvsharer.cache.compose.apply_setting``) and records

* ``streamed``: the logits of a chunked forward through one cache (``kvsharer.evaluate.streaming``);
* ``one_pass``: the logits of one forward with ``use_cache=False`` (and whether it returned a cache);
* ``footprint``: the K/V bytes ``kvsharer.evaluate.ppl.perplexity`` reports for one window, and the cache it filled: every
  layer's class, stored tokens and contents;
* ``generate``: greedy generation from a left-padded batch: the tokens, every step's logits and the
  returned cache;
* ``expected_bytes``: the prediction from the shapes alone (``kvsharer.measure.profile.expected_bytes``).

A tensor is recorded as its shape, dtype, float64 sum, sum of absolute values and first values (``float.hex``).
``tests/test_cache_method.py`` recomputes every case and compares: shapes, dtypes, classes, token counts,
bytes and generated tokens exactly; sums and values within a tolerance relative to the tensor's magnitude
(``close``), so that a CPU whose float kernels sum in another order still compares, and a change of
behaviour still fails. Run ``python tests/make_cache_method_reference.py`` to write the file again (only when
a change of numbers is intended).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "cache_method_reference.json"
SPECS = ["none", "h2o:0.5", "pyramidinfer:0.5", "kvmerger:0.5", "streamingllm:0.5", "snapkv:0.5",
         "int8", "int4", "int2", "minicache:0.25"]
SHARING_MAP = [0, 1, 2, 1, 4, 4, 2, 0]  # 4 of 8 layers read an earlier layer's K/V
MODELS = {  # name -> make_tiny arguments (8 layers, hidden 64, 4 query heads of 16)
    "llama_mha": dict(family="llama", num_key_value_heads=4, seed=0),
    "qwen3_gqa": dict(family="qwen3", seed=1),  # 2 KV heads, q/k norms
    # every layer a 16-token window, sequences longer than it: a sharer attends over what its source did
    "mistral_sliding": dict(family="mistral", sliding_window=16, seed=2),
}
CHUNK, BATCH, TOKENS = 8, 2, 40  # streamed: [2, 40] in chunks of 8
PROMPT, NEW = 36, 6  # generate: [2, 36] (row 1 left-padded by 5) + 6 tokens; int<bits> quantizes past 32
SKIP_ATTRIBUTES = ("source", "pair", "method", "_tap", "update")  # links to other layers, the method or the
# per-forward view of a source's returned K/V (ReturnedKV), not contents


def model(name: str):
    args = dict(MODELS[name])
    return make_tiny(args.pop("family"), **args)


def settings() -> list[tuple[str, bool]]:
    """(spec, with the sharing policy) pairs: every spec alone and with sharing."""
    return [(spec, share) for spec in SPECS for share in (False, True)]


def cases() -> list[tuple[str, str, bool]]:
    return [(name, spec, share) for name in MODELS for spec, share in settings()]


def case_key(name: str, spec: str, share: bool) -> str:
    return f"{name}/{spec}/{'shared' if share else 'alone'}"


# ------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------


def digest(tensor: torch.Tensor, first: int = 4) -> dict:
    t = tensor.detach().cpu().contiguous()
    flat = t.reshape(-1)
    values = flat.double() if t.dtype.is_floating_point else flat.long()
    first = [float(x).hex() if t.dtype.is_floating_point else int(x) for x in values[:first].tolist()]
    total = values.sum().item()
    out = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
           "sum": float(total).hex() if t.dtype.is_floating_point else int(total), "first": first}
    if t.dtype.is_floating_point:
        signs = torch.randint(0, 2, values.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
        out["abs_sum"] = float(values.abs().sum().item()).hex()
        out["signed_sum"] = float((values * signs).sum().item()).hex()  # a seeded ±1 projection: order-sensitive
    return out


# A float's tolerance: sums within RTOL of the tensor's sum of |x| (float reordering moves each element by ~1e-6
# of its size, in random directions: far less), single values within 10·RTOL of their size; ATOL: a floor.
RTOL, ATOL = 1e-5, 1e-6


def close(got, want, where: str = "") -> list[str]:
    """Where ``got`` differs from the recorded ``want`` (empty: it matches): digests within the tolerance,
    everything else (types, shapes, counts, bytes, tokens, integer codes) exactly."""
    if isinstance(want, dict) and "shape" in want and "dtype" in want and "first" in want:  # a tensor's digest
        if not isinstance(got, dict) or (got["shape"], got["dtype"]) != (want["shape"], want["dtype"]):
            return [f"{where}: {got} vs {want}"]
        if "abs_sum" not in want:  # integers (token ids, quantized codes): exact
            return [] if (got["sum"], got["first"]) == (want["sum"], want["first"]) else [f"{where}: integer values differ"]
        scale = float.fromhex(want["abs_sum"])
        mean = scale / max(1, math.prod(want["shape"]))
        problems = []
        for key in ("sum", "abs_sum", "signed_sum"):
            a, b = float.fromhex(got[key]), float.fromhex(want[key])
            if abs(a - b) > RTOL * scale + ATOL:
                problems.append(f"{where}: {key} {a} vs {b}")
        for a, b in zip(got["first"], want["first"]):
            a, b = float.fromhex(a), float.fromhex(b)
            if abs(a - b) > 10 * RTOL * max(abs(b), mean) + ATOL:
                problems.append(f"{where}: first values {got['first']} vs {want['first']}")
                break
        return problems
    if isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            return [f"{where}: keys {sorted(got) if isinstance(got, dict) else got} vs {sorted(want)}"]
        return [p for k in want for p in close(got[k], want[k], f"{where}/{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: {got} vs {want}"]
        return [p for i, (a, b) in enumerate(zip(got, want)) for p in close(a, b, f"{where}[{i}]")]
    if isinstance(want, str) and isinstance(got, str) and want.startswith(("0x", "-0x")) and "p" in want:  # float.hex
        a, b = float.fromhex(got), float.fromhex(want)
        return [] if abs(a - b) <= RTOL * max(abs(b), 1e-12) + ATOL else [f"{where}: {a} vs {b}"]
    return [] if got == want else [f"{where}: {got!r} vs {want!r}"]


def contents(value, depth: int = 0):
    """Tensors and plain values reachable from a cache layer's attributes (recursively), as JSON."""
    if isinstance(value, torch.Tensor):  # a cache layer's tensors: their sums are enough to compare
        return digest(value, first=0)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [contents(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): contents(v, depth + 1) for k, v in sorted(value.items())}
    if depth < 4 and type(value).__module__.startswith("kvsharer"):  # e.g. MiniCache's MergedState
        return {"type": type(value).__name__, **{k: contents(v, depth + 1) for k, v in sorted(vars(value).items())
                                                 if k not in SKIP_ATTRIBUTES}}
    return type(value).__name__


def cache_record(cache) -> dict:
    from kvsharer.cache.sharing import cache_nbytes
    from kvsharer.methods.intra import stored_tokens

    layers = [{"type": type(layer).__name__,
               **{k: contents(v) for k, v in sorted(vars(layer).items()) if k not in SKIP_ATTRIBUTES}}
              for layer in cache.layers]
    return {"types": [layer["type"] for layer in layers], "stored_tokens": stored_tokens(cache),
            "seq_length": cache.get_seq_length(), "nbytes": cache_nbytes(cache), "layers": layers}


def inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (BATCH, TOKENS), generator=g)
    prompt = torch.randint(3, 96, (BATCH, PROMPT), generator=g)
    mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    mask[1, :5] = 0
    return ids, prompt.masked_fill(mask == 0, 0), mask


def record(model, spec: str, share: bool) -> dict:
    """Everything a setting does to ``model`` (see the module docstring)."""
    from kvsharer import SharingPolicy
    from kvsharer.cache.compose import CacheMethod, apply_setting
    from kvsharer.evaluate.ppl import perplexity
    from kvsharer.evaluate.streaming import streamed_logits
    from kvsharer.measure.profile import expected_bytes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order, whatever the machine's cores
    try:
        method = CacheMethod.parse(spec)
        policy = SharingPolicy(SHARING_MAP) if share else None
        ids, prompt, mask = inputs()
        try:
            setting = apply_setting(model, policy, method)
            setting.__enter__()
        except ValueError as err:  # a rival of sharing (MiniCache) runs without a policy
            return {"refused": type(err).__name__}
        try:  # a failure is an outcome too (sharing a sliding layer past its window fails, see MODELS)
            with torch.inference_mode():
                streamed = streamed_logits(model, ids, CHUNK)
                one = model(input_ids=ids, use_cache=False)
                footprint = perplexity(model, ids, ids.shape[0], CHUNK)  # every row's bytes / rows
                cache = footprint_cache(model, ids[:1])
            out = model.generate(prompt, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        except RuntimeError as err:
            return {"error": f"{type(err).__name__}: {str(err)[:120]}"}
        finally:
            setting.__exit__(None, None, None)
        return {
            "streamed": digest(streamed),
            "one_pass": {"logits": digest(one.logits), "cache": one.past_key_values is not None},
            "footprint": {"kv_bytes": footprint["kv_bytes"], "kv_bytes_plain": footprint["kv_bytes_plain"],
                          "kv_fraction": float(footprint["kv_fraction"]).hex(), "cache": cache_record(cache)},
            "generate": {"sequences": out.sequences.tolist(), "logits": digest(torch.stack(out.logits)),
                         "cache": cache_record(out.past_key_values)},
            "expected_bytes": expected_bytes(model, policy, method, BATCH, TOKENS),
        }
    finally:
        torch.set_num_threads(threads)


def footprint_cache(model, ids):
    """One row's cache, filled as ``perplexity`` streams it (chunks of CHUNK)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    for start in range(0, ids.shape[1], CHUNK):
        model(input_ids=ids[:, start : start + CHUNK], past_key_values=cache, use_cache=True)
    return cache


def compute() -> dict:
    out = {}
    for name in MODELS:
        m = model(name)
        for spec, share in settings():
            out[case_key(name, spec, share)] = record(m, spec, share)
    return out


def main() -> None:
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
