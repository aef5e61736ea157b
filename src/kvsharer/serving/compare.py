"""Greedy generations through vLLM or through transformers + ``share_kv``, written to JSON.

vLLM and this package's main environment pin different transformers versions, so the two sides run in
their own environments and meet in files::

    .venv/bin/python       -m kvsharer.serving.compare transformers --model DIR --policy p25=P.json --out hf.json
    .venv-serve/bin/python -m kvsharer.serving.compare vllm --model DIR --policy p25=P.json \
        --prompts-from hf.json --out vllm.json
    python -m kvsharer.serving.compare diff hf.json vllm.json     # any environment: JSON only

The transformers side tokenizes the prompts and writes the token ids; the vLLM side generates from those
ids (no tokenizer difference can creep in). Both run greedy decoding for exactly ``--max-new-tokens`` tokens
(EOS does not stop either) and record, per step, the chosen token and its log-probability under the raw
logits. Every run covers the plain model and each ``--policy NAME=FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon",
    "A recipe for pancakes: first, mix",
    "The most important rule of machine learning is",
    "Photosynthesis is the process by which plants",
    "My favourite book is",
    "Question: What is 12 times 12?\nAnswer:",
    "The quick brown fox",
]


def _policies(specs: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {"plain": None}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--policy takes NAME=FILE, got {spec!r}")
        out[name] = path
    return out


def set_threads(threads: int) -> None:
    """``threads`` CPU threads for torch, and for vLLM's CPU worker (no core binding: ``nobind``)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch

    torch.set_num_threads(threads)


def run_transformers(model_dir: str, policies: dict[str, str | None], prompts: list[str], new_tokens: int) -> dict:
    import torch

    from ..cache.policy import SharingPolicy
    from ..cache.sharing import share_kv
    from ..models.loading import load_model

    model, tokenizer = load_model(model_dir, dtype="float32")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    runs = {}
    for name, path in policies.items():
        policy = SharingPolicy.from_json(path) if path else None
        started = time.perf_counter()
        seqs = []
        for prompt_ids in ids:
            with torch.inference_mode(), (share_kv(model, policy) if policy else _nothing()):
                out = model(torch.tensor([prompt_ids]), use_cache=True)
                tokens, logprobs = [], []
                for _ in range(new_tokens):
                    lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                    token = int(lp.argmax())
                    tokens.append(token)
                    logprobs.append(float(lp[token]))
                    out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            seqs.append({"tokens": tokens, "logprobs": logprobs})
        runs[name] = {"policy": path, "map": policy.map if policy else None, "seconds": time.perf_counter() - started,
                      "outputs": seqs}
    import transformers

    return {"engine": "transformers", "version": transformers.__version__, "model": model_dir,
            "prompts": prompts, "prompt_ids": ids, "new_tokens": new_tokens, "runs": runs}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_vllm(model_dir: str, policies: dict[str, str | None], prompt_ids: list[list[int]], new_tokens: int,
             kv_cache_bytes: int = 256 << 20, max_model_len: int = 512) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    from .overrides import serving_overrides
    from .vllm_plugin import register

    register()
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    runs = {}
    for name, path in policies.items():
        started = time.perf_counter()
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0, max_model_len=max_model_len,
                  kv_cache_memory_bytes=kv_cache_bytes, hf_overrides=serving_overrides(model_dir, path))
        loaded = time.perf_counter()
        blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        results = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        seqs = []
        for result in results:
            out = result.outputs[0]
            tokens = list(out.token_ids)
            seqs.append({"tokens": tokens, "logprobs": [float(step[t].logprob) for t, step in zip(tokens, out.logprobs)]})
        runs[name] = {"policy": path, "kv_blocks": blocks, "kv_cache_bytes": kv_cache_bytes,
                      "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
                      "load_seconds": loaded - started, "seconds": time.perf_counter() - loaded,
                      "outputs": seqs}
        del llm
    return {"engine": "vllm", "version": vllm.__version__, "model": model_dir, "prompt_ids": prompt_ids,
            "new_tokens": new_tokens, "runs": runs}


def diff(a: dict, b: dict) -> dict:
    """Per run present in both: prompts whose tokens agree in full, the first divergence of each, and the
    largest |log-prob difference| over the steps before the first divergence (same context on both sides)."""
    out = {}
    for name in a["runs"]:
        if name not in b["runs"]:
            continue
        equal, first, worst = 0, [], 0.0
        for x, y in zip(a["runs"][name]["outputs"], b["runs"][name]["outputs"]):
            n = next((i for i, (s, t) in enumerate(zip(x["tokens"], y["tokens"])) if s != t),
                     min(len(x["tokens"]), len(y["tokens"])))
            full = n == len(x["tokens"]) == len(y["tokens"])
            equal += full
            first.append(None if full else n)
            # up to and including the first divergence: the context is still the same there
            upto = min(n + 1, len(x["logprobs"]), len(y["logprobs"]))
            for i in range(upto):
                if x["tokens"][i] == y["tokens"][i]:
                    worst = max(worst, abs(x["logprobs"][i] - y["logprobs"][i]))
        out[name] = {"prompts": len(first), "equal_prompts": equal, "first_divergence": first,
                     "max_abs_logprob_diff": worst}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvsharer.serving.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="engine", required=True)
    for engine in ("transformers", "vllm"):
        p = sub.add_parser(engine)
        p.add_argument("--model", required=True, help="a prepared model folder (prepare-model --out)")
        p.add_argument("--policy", action="append", default=[], metavar="NAME=FILE", help="a policy JSON (repeatable)")
        p.add_argument("--max-new-tokens", type=int, default=24)
        p.add_argument("--out", required=True)
        p.add_argument("--threads", type=int, default=1,
                       help="CPU threads (default 1: on a shared machine more threads than free cores is far slower)")
        if engine == "vllm":
            p.add_argument("--prompts-from", required=True, help="the transformers side's JSON (its prompt ids)")
            p.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
        else:
            p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    p = sub.add_parser("diff")
    p.add_argument("a")
    p.add_argument("b")
    args = parser.parse_args(argv)
    if args.engine == "diff":
        print(json.dumps(diff(json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())), indent=2))
        return 0
    policies = _policies(args.policy)
    set_threads(args.threads)
    if args.engine == "transformers":
        result = run_transformers(args.model, policies, PROMPTS[: args.prompts], args.max_new_tokens)
    else:
        ids = json.loads(Path(args.prompts_from).read_text())["prompt_ids"]
        result = run_vllm(args.model, policies, ids, args.max_new_tokens, args.kv_cache_bytes)
    Path(args.out).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
