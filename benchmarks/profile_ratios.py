"""Ratios to the plain model from profile CSVs: ``python benchmarks/profile_ratios.py a.csv ... --out r.json``.

For every (model, batch, context) measured, each setting (sharing rate x cache method) is divided by
the plain model (rate 0, no cache method) of the same run: KV bytes, peak memory, prefill seconds,
decode tokens/s; and, from the ``max_batch`` rows, the largest batch that fits the memory budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd


def ratios(frame: pd.DataFrame) -> list[dict]:
    frame = frame.copy()
    frame["cache"] = frame["cache"].fillna("none") if "cache" in frame else "none"
    out = []
    grid = frame[frame["kind"] == "grid"]
    for (model, batch, context), part in grid.groupby(["model", "batch", "context"]):
        base = part[(part["rate"] == 0) & (part["cache"] == "none")]
        if base.empty:
            continue
        base = base.iloc[0]
        for _, row in part.iterrows():
            out.append({"model": model, "batch": int(batch), "context": int(context), "rate": float(row["rate"]),
                        "cache": row["cache"],
                        **{f"{c}_ratio": (row[c] / base[c] if pd.notna(row[c]) and base[c] else None)
                           for c in ("kv_bytes", "peak_bytes", "prefill_s", "decode_tok_s")}})
    for (model, context), part in frame[frame["kind"] == "max_batch"].groupby(["model", "context"]):
        base = part[(part["rate"] == 0) & (part["cache"] == "none")]
        if base.empty or not base.iloc[0]["batch"]:
            continue
        for _, row in part.iterrows():
            out.append({"model": model, "context": int(context), "rate": float(row["rate"]), "cache": row["cache"],
                        "max_batch": int(row["batch"]), "max_batch_ratio": row["batch"] / base.iloc[0]["batch"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    frame = pd.concat([pd.read_csv(p) for p in args.csv], ignore_index=True)
    rows = ratios(frame)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"inputs": [str(p) for p in args.csv], "ratios": rows}, indent=2) + "\n")
    tmp.replace(args.out)
    for r in rows:
        if "kv_bytes_ratio" in r:
            print(f"{r['model']:>14} batch {r['batch']:>3} ctx {r['context']:>5} rate {r['rate']:<6g} {r['cache']:<16}"
                  f" KV x{_f(r['kv_bytes_ratio'])}  peak x{_f(r['peak_bytes_ratio'])}"
                  f"  decode x{_f(r['decode_tok_s_ratio'])}")
        else:
            print(f"{r['model']:>14} max batch at ctx {r['context']:>5} rate {r['rate']:<6g} {r['cache']:<16}"
                  f" {r['max_batch']} (x{_f(r['max_batch_ratio'])})")
    print(f"-> {args.out}")
    return 0


def _f(value) -> str:
    return "  -  " if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
