"""Stage ``generate``: run a prompt with a sharing policy; print the text and the KV-cache bytes used."""

from __future__ import annotations

import argparse
import json
import logging

import torch

from ..cache.policy import SharingPolicy
from ..cache.sharing import expected_kv_nbytes
from ..evaluate.generate import generate
from ..models.loading import DEFAULT_MODEL, DTYPES, check_source, find_parts, load_model, resolve_device

log = logging.getLogger("kvsharer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder, hub id or embedded:<name>")
    parser.add_argument("--policy", help="policy JSON file (default: no sharing)")
    parser.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def main(args: argparse.Namespace) -> int:
    check_source(args.model)
    policy = SharingPolicy.from_json(args.policy) if args.policy else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn,
                                  device=resolve_device(args.device))
    n_layers = find_parts(model).n_layers
    policy = policy or SharingPolicy.identity(n_layers)
    texts, nbytes, tokens = generate(model, tokenizer, args.prompt, policy, args.max_new_tokens, args.chat)
    plain = expected_kv_nbytes(model, None, len(args.prompt), tokens, torch.finfo(model.dtype).bits // 8)
    summary = {
        "policy": args.policy, "shared_layers": policy.shared_layers, "rate": policy.rate,
        "kv_bytes": nbytes, "kv_bytes_plain": plain, "kv_ratio": nbytes / plain if plain else None,
        "cached_tokens": tokens, "texts": texts,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for text in texts:
            print(text.strip())
            print("-" * 40)
        print(
            f"KV cache: {nbytes:,} bytes for {tokens} tokens x {len(texts)} sequences "
            f"({n_layers - policy.num_shared}/{n_layers} layers store K/V; plain model: {plain:,} bytes, "
            f"ratio {nbytes / plain:.4f})"
        )
    return 0
