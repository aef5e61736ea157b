"""Stage ``search``: the KVSharer greedy policy search (:mod:`kvsharer.search.greedy`) on a calibration file,
with its journal.

Every evaluated candidate is appended to a journal (``<out>.journal.jsonl``) and flushed; a killed search
resumes from it: journaled candidates are not re-run (their stored similarity decides, exactly as it did).
``--after`` names the policy of the same search to a smaller target, whose journal seeds this one's.
``--start`` names the plain model's run on the calibration samples (stage ``calibration-states``), from which
a fast search starts instead of computing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from ..atomic import atomic_write_text
from ..provenance import sha256_file  # noqa: F401 (also used by calibration-states)
from ..cache.policy import SharingPolicy
from ..models.loading import DTYPES, check_source, load_model, model_id, resolve_device
from ..names import FITTED_ORDERS, MEASURED_ORDERS, ORDERS, check_order, maps_file
from ..search import calibrate
from ..search.distance import check_metric
from ..search.greedy import (PROCEDURES, Journal, SearchSettings, check_threshold, journal_header, run_search,
                             target_layers)

log = logging.getLogger("kvsharer")


# ------------------------------------------------------------------------------------------------
# the journal file
# ------------------------------------------------------------------------------------------------


def read_journal(path: Path, header: dict) -> list[dict] | None:
    """The lines of a journal written for ``header`` (header first; a line cut by a kill and everything
    after it dropped), or None when there is none or it was written for other settings or inputs."""
    if not path.exists():
        return None
    good = []
    for line in path.read_text().splitlines():
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if good and good[0].get("header") == header:
        return good
    log.warning("journal %s was written for other settings or inputs; not reused", path)
    return None


def _appender(path: Path):
    def append(entry: dict) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    return append


def open_journal(path: Path | None, header: dict, seed: Path | None = None) -> Journal:
    """The journal at ``path`` for ``header``, rewritten to its good lines (or started with the header);
    new entries are appended to it and synced. ``seed``: the journal of the same search run to a smaller
    target (its candidates are this search's first ones), used when it holds more candidates than ``path``
    (a search to this target killed early). ``path`` None: a journal kept nowhere."""
    if path is None:
        return Journal(header)
    lines = read_journal(path, header)
    seeded = read_journal(seed, header) if seed is not None else None
    # both are prefixes of one deterministic sequence of candidates: the longer one holds the other
    if seeded is not None and len(seeded) > len(lines or []):
        lines = seeded
        log.info("starting from %s (the same search to a smaller target)", seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = lines or [{"header": header}]
    journal = Journal(header, lines, _appender(path), path)
    if journal.entries:
        log.info("resuming: %d candidates already evaluated", len(journal.entries))
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in lines))
    return journal


def run_journaled(model, stats: dict, settings: SearchSettings, journal_path: Path | None = None,
                  calibration_hash: str = "", progress: bool = True, seed_journal: Path | None = None,
                  start: dict | None = None) -> dict:
    """:func:`kvsharer.search.greedy.run_search` with its journal kept in ``journal_path``.

    ``seed_journal``: the journal of this search to a smaller target, whose candidates are not re-run.
    ``start``: the plain model's run (:func:`kvsharer.search.greedy.plain_run`) to start from."""
    header = journal_header(settings, calibration_hash, stats["keys"].shape[0])
    return run_search(model, stats, settings, open_journal(journal_path, header, seed_journal), progress, start)


def states_header(calibration_hash: str, batch_size: int | None, dtype: str) -> dict:
    """What a plain-run file (stage ``calibration-states``) was made from, written into it and checked by
    :func:`read_start`: the calibration file, the batch size and the dtype."""
    return {"calibration_sha256": calibration_hash, "batch_size": batch_size, "dtype": dtype}


def read_start(path: Path, calibration_hash: str, batch_size: int | None, dtype: str) -> dict | None:
    """The plain run in ``path`` (stage ``calibration-states``) when it was made from this calibration file at this
    batch size and dtype (then the search computes exactly what it would have); None, with the reason logged,
    when not."""
    with safe_open(str(path), framework="pt") as fh:
        made = json.loads((fh.metadata() or {}).get("kvsharer", "{}"))
    want = states_header(calibration_hash, batch_size, dtype)
    differ = [f"{k} {made.get(k)!r} (this search: {v!r})" for k, v in want.items() if made.get(k) != v]
    if differ:
        log.warning("not starting from %s: it was made with %s; computing the plain run instead", path, ", ".join(differ))
        return None
    return load_file(str(path))


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model the calibration file was made with")
    parser.add_argument("--calibration", required=True, type=Path, help="calibration .safetensors (from `calibrate`)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rate", type=float, help="share round(rate x L) layers, rate in [0, (L-1)/L]")
    size.add_argument("--layers", type=int, help="share this many layers")
    parser.add_argument("--threshold", type=float, default=0.5, help="accept when mean similarity > T (paper 0.5)")
    parser.add_argument("--order", default="dissimilar", help=f"pair order: {', '.join(ORDERS)}")
    parser.add_argument("--metric", default="euclidean", help="distance metric: euclidean, cosine, cka")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random order")
    parser.add_argument("--procedure", default="fast", choices=PROCEDURES)
    parser.add_argument("--sources", type=int, default=3,
                        help="measured orders: nearest sources (by --metric) measured per storing layer; 0: all")
    parser.add_argument("--refresh", type=int, default=8,
                        help="measured orders: best-so-far candidates re-measured per step after the first; 0: all")
    parser.add_argument("--screen", type=int, default=0,
                        help="measured orders: score each new pair on the first N calibration samples, then measure "
                             "the --refresh best on all of them (0: off, every candidate on all samples)")
    parser.add_argument("--batch-size", type=int, default=None, help="fast: samples per forward (default all)")
    parser.add_argument("--max-candidates", type=int, default=None,
                        help="evaluate at most this many candidates (a time budget; default: no limit)")
    parser.add_argument("--samples", type=int, help="expected N of the calibration file (checked)")
    parser.add_argument("--tokens", type=int, help="expected T of the calibration file (checked)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path, help="policy JSON (journal: <out>.journal.jsonl)")
    parser.add_argument("--after", type=Path, default=None,
                        help="policy JSON of the same search to a smaller target: its journal's candidates are not re-run")
    parser.add_argument("--start", type=Path, default=None,
                        help="fast procedure: the plain model's run on the calibration samples (from `calibration-states`), "
                             "from which the search starts instead of computing it")


def check_map_family(model: str) -> None:
    """The fitted order's maps need a family whose keys they can un-rotate: refused from the folder's config.json
    (or the shape table) before the weights load; a model known neither way is checked once loaded."""
    from ..models.shapes import architecture_of
    from ..names import MAP_FAMILIES

    config = Path(model) / "config.json"
    family = (json.loads(config.read_text()).get("model_type") if config.is_file()
              else getattr(architecture_of(model), "family", None))
    if family is not None and family not in MAP_FAMILIES:
        raise ValueError(f"order 'fitted': its K/V maps support the {', '.join(MAP_FAMILIES)} families, not {family} "
                         f"({model})")


def check_calibration(meta: dict, model: str, samples: int | None, tokens: int | None) -> None:
    """The calibration file must come from this model and have the expected N and T."""
    source, weights = model_id(model)
    if weights and meta.get("weights_sha256"):  # same weights, wherever the folder lives
        same = meta["weights_sha256"] == weights
    else:
        same = meta.get("model_source") == source
    if not same:
        raise ValueError(
            f"calibration file was made with model {meta.get('model_source')!r} "
            f"(weights {str(meta.get('weights_sha256'))[:12]}), not {source!r} (weights {str(weights)[:12]})"
        )
    for name, want in (("samples", samples), ("tokens", tokens)):
        if want is not None and meta.get(name) != want:
            raise ValueError(f"calibration file has {name}={meta.get(name)}, expected {want}")


def main(args: argparse.Namespace) -> int:
    # every check that needs no model comes first
    check_source(args.model)
    check_order(args.order)
    if args.order in FITTED_ORDERS:
        check_map_family(args.model)
    check_metric(args.metric)
    check_threshold(args.threshold)
    if (args.order in MEASURED_ORDERS or args.order in FITTED_ORDERS) and args.procedure != "fast":
        raise ValueError(f"order {args.order!r} measures candidates with the fast procedure only, not {args.procedure!r}")
    for name in ("sources", "refresh", "screen"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0 (0: all), got {getattr(args, name)}")
    if args.max_candidates is not None and args.max_candidates < 1:
        raise ValueError(f"--max-candidates must be at least 1, got {args.max_candidates}")
    if args.start is not None and not args.start.is_file():
        raise ValueError(f"--start {args.start} not found (run `calibration-states` first)")
    meta = calibrate.read_meta(args.calibration)
    n_layers = meta["n_layers"]
    target = target_layers(n_layers, args.rate, args.layers)
    check_calibration(meta, args.model, args.samples, args.tokens)
    if args.screen and not (args.order in MEASURED_ORDERS and args.refresh and args.screen < meta["samples"]):
        raise ValueError(f"--screen {args.screen} needs a measured order, --refresh > 0 and fewer samples than the "
                         f"calibration file's {meta['samples']}")
    settings = SearchSettings(target=target, threshold=args.threshold, order=args.order, metric=args.metric,
                              seed=args.seed, procedure=args.procedure, batch_size=args.batch_size,
                              max_candidates=args.max_candidates, sources=args.sources or None,
                              refresh=args.refresh or None, screen=args.screen or None)

    stats = calibrate.load(args.calibration)
    model, _ = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    calibration_hash = sha256_file(args.calibration)
    journal = args.out.with_name(args.out.name + ".journal.jsonl")
    log.info("search: %s order, %s metric, T=%s, target %d/%d layers, %s procedure", args.order, args.metric,
             args.threshold, target, n_layers, args.procedure)
    seed = args.after.with_name(args.after.name + ".journal.jsonl") if args.after else None
    start = None
    if args.start is not None and args.procedure == "fast":
        start = read_start(args.start, calibration_hash, args.batch_size, args.dtype)
        if start is not None:
            log.info("starting from the plain run in %s", args.start)
    result = run_journaled(model, stats, settings, journal, calibration_hash, seed_journal=seed, start=start)
    maps = result.pop("kv_maps", None)
    if maps is not None:  # written first: a policy file never names maps that are not there
        maps_path = Path(maps_file(str(args.out)))
        maps.save(maps_path)
        result |= {"kv_maps": maps_path.name, "kv_maps_sha256": sha256_file(maps_path), "kv_maps_bytes": maps.nbytes}
        log.info("fitted K/V maps of %d sharing layers (%.2f MB) -> %s", len(maps), maps.nbytes / 1e6, maps_path)
    policy = SharingPolicy(result.pop("map"), {
        "model": args.model, "rate": result["num_shared"] / n_layers, "rate_requested": args.rate,
        **result, "settings": asdict(settings), "calibration": str(args.calibration),
        "calibration_sha256": calibration_hash,
    })
    policy.to_json(args.out)
    accepted = [t for t in result["trace"] if t["accepted"]]
    log.info("policy %s: %d/%d layers share (%s); %d candidates evaluated (%d from the journal) in %.1f s -> %s",
             "complete" if result["complete"] else "INCOMPLETE", result["num_shared"], n_layers,
             ", ".join(f"{t['pair'][0]}->{t['pair'][1]}" for t in accepted) or "none",
             result["candidates_evaluated"], result["candidates_resumed"], result["seconds"], args.out)
    if not result["complete"]:
        why = "the candidate budget ran out" if result["stopped"] == "budget" else "pairs ran out"
        log.warning("INCOMPLETE: %s before the target: only %d of %d layers share at T=%s",
                    why, result["num_shared"], target, args.threshold)
    return 0
