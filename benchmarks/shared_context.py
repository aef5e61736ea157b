"""Multiple-choice scoring, lm-eval's way vs one prefill per context, side by side: time, tokens read, scores.

    python benchmarks/shared_context.py --model embedded:smollm2-135m-instruct
    python benchmarks/shared_context.py --model <tiny folder> --items 3 --context 40 --out /tmp/x.json  # smoke

The same requests go through both arms at batch size 1 (the demo's and the rehearsal's): ``--items``
questions with a ``--context``-token passage and four choices of ``--choice`` tokens (random token ids, a
fixed seed). The reference is lm-eval's own ``HFLM._loglikelihood_tokens`` (one forward over context +
choice per choice); ours is the harness stage's ``scoring_lm`` (``kvsharer.evaluate.shared_context``: the
context prefilled once, each choice scored from a copy of its cache). The arms alternate ``--repeats`` times.
Prints the time ratio ours / lm-eval's, the tokens each arm fed the model, and the largest difference of the
log-likelihoods, and writes them to JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from kvsharer.atomic import atomic_write_text
from kvsharer.evaluate.harness import scoring_lm
from kvsharer.models.loading import load_model
from run_facts import run_facts  # benchmarks/ is the script's folder


def requests_for(vocab: int, items: int, context: int, choice: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(items):
        ctx = torch.randint(3, vocab, (context,), generator=g).tolist()
        out += [(("", ""), ctx, torch.randint(3, vocab, (choice,), generator=g).tolist()) for _ in range(4)]
    return out


def main(argv=None) -> int:
    launched = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=10, help="questions (four choices each)")
    parser.add_argument("--context", type=int, default=300, help="tokens of each question's passage")
    parser.add_argument("--choice", type=int, default=12, help="tokens of each choice")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/benchmarks/shared_context.json")
    args = parser.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    requests = requests_for(min(model.config.vocab_size, len(tokenizer)), args.items, args.context, args.choice)
    tokens: list[int] = []
    model.model.register_forward_pre_hook(lambda m, a, kw: tokens.append(kw["input_ids"].shape[1]), with_kwargs=True)
    arms = {"lm_eval": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1),
            "ours": scoring_lm(HFLM, None)(pretrained=model, tokenizer=tokenizer, batch_size=1)}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    scores, fed = {}, {}
    for _ in range(args.repeats):
        for arm, lm in arms.items():
            tokens.clear()
            start = time.perf_counter()
            scores[arm] = lm._loglikelihood_tokens(requests, disable_tqdm=True)
            seconds[arm].append(time.perf_counter() - start)
            fed[arm] = sum(tokens)
    worst = max(abs(a - b) for (a, _), (b, _) in zip(scores["ours"], scores["lm_eval"]))
    same_greedy = [g for _, g in scores["ours"]] == [g for _, g in scores["lm_eval"]]
    if worst > 1e-3 or not same_greedy:
        raise AssertionError(f"the arms disagree: log-likelihoods differ by up to {worst:.2e}, same greedy: {same_greedy}")
    median = {arm: statistics.median(s) for arm, s in seconds.items()}
    result = {
        "benchmark": "shared_context", "model": args.model, "device": args.device, "host": platform.node(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "items": args.items, "choices": 4, "context_tokens": args.context, "choice_tokens": args.choice,
        "seconds": seconds, "seconds_median": median, "time_ratio": median["ours"] / median["lm_eval"],
        "tokens_fed": fed, "tokens_ratio": fed["ours"] / fed["lm_eval"], "max_abs_loglikelihood_diff": worst,
        **run_facts(launched, argv),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{args.items} questions x 4 choices, {args.context}-token contexts, {args.choice}-token choices, batch 1 on "
          f"{args.device}:\n"
          f"  time ratio (one prefill per context / lm-eval's, median of {args.repeats}): {result['time_ratio']:.3f}\n"
          f"  tokens fed: {fed['ours']} vs {fed['lm_eval']} (ratio {result['tokens_ratio']:.3f}); "
          f"log-likelihoods within {worst:.1e}\n  written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
