"""What every cache method does to a model, recorded bit-exactly: ``tests/data/cache_method_reference.json``.

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

A tensor is recorded as its shape, dtype, the sha256 of its bytes (the bit-exact part), its float64 sum and
first values (``float.hex``, to see how far a mismatch is). ``tests/test_cache_method.py`` recomputes every
case and compares. Run ``python tests/make_cache_method_reference.py`` to write the file again (only when a
change of numbers is intended).
"""

from __future__ import annotations

import hashlib
import json
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
    # every layer a 16-token window; sharing such a layer fails once a sequence is longer than the window
    # (the sharer's mask and its source's keys disagree): recorded as it is
    "mistral_sliding": dict(family="mistral", sliding_window=16, seed=2),
}
CHUNK, BATCH, TOKENS = 8, 2, 40  # streamed: [2, 40] in chunks of 8
PROMPT, NEW = 36, 6  # generate: [2, 36] (row 1 left-padded by 5) + 6 tokens; int<bits> quantizes past 32
SKIP_ATTRIBUTES = ("source", "pair", "method")  # links to other layers or to the method, not contents


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


def digest(tensor: torch.Tensor) -> dict:
    t = tensor.detach().cpu().contiguous()
    flat = t.reshape(-1)
    values = flat.double() if t.dtype.is_floating_point else flat.long()
    first = [float(x).hex() if t.dtype.is_floating_point else int(x) for x in values[:4].tolist()]
    total = values.sum().item()
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest(),
            "sum": float(total).hex() if t.dtype.is_floating_point else int(total), "first": first}


def contents(value, depth: int = 0):
    """Tensors and plain values reachable from a cache layer's attributes (recursively), as JSON."""
    if isinstance(value, torch.Tensor):
        return digest(value)
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
    text = json.dumps(layers, sort_keys=True)
    return {"types": [layer["type"] for layer in layers], "stored_tokens": stored_tokens(cache),
            "seq_length": cache.get_seq_length(), "nbytes": cache_nbytes(cache),
            "layers_sha256": hashlib.sha256(text.encode()).hexdigest()}


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
