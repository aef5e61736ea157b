"""The KVSharer greedy policy search, in the authors' way and in a fast, exact way (its stage: ``search``,
:mod:`kvsharer.stages.search`).

The loop (docs/architecture.md, after the authors' notebook): start from the identity map; walk the ranked layer
pairs (i, j), i > j; skip a pair whose layer i already shares; the candidate is the accepted map with
i → j, chains resolved in layer order; run the candidate on the calibration samples; per sample take the
cosine similarity of the *flattened* last hidden state with the reference; accept when the mean over
samples is > T. Stop at the target number of shared layers, or when pairs run out (then ``complete`` is
false — never silently fewer).

Two procedures compute the same similarities:

* ``official`` — the authors' loop as written: for every candidate and every sample, one forward of the
  plain model (reference) and one of the candidate, a single sample at a time, full model with LM head.
* ``fast`` — exact shortcuts, each justified where it is taken:
  1. the reference is read from the calibration file: the plain model on the same inputs is the same
     every time, so recomputing it per candidate changes nothing;
  2. samples run batched: each sample's forward is independent of the others (causal attention within
     a sample, no cross-sample op), so batching only changes float summation order (~1e-7);
  3. a candidate's forward starts at its first changed layer f: layers < f have the same map entries as
     the accepted policy and (by induction from the embeddings) the same inputs, so their outputs and the
     K/V they store are those of the accepted policy's run, which we keep; they are *replayed*;
  4. the forward stops at the final norm: the similarity is on the last hidden state, the LM head is
     not needed.

The plain model's run, layer by layer (every layer's output and K/V on the calibration samples: the state
every fast search starts from), can be computed once per calibration file (:func:`plain_run`, the stage
``calibration-states``) and handed to each search (``run_search(..., start=...)``): the search then skips its
first full forward. It is the same code on the same inputs, so the search finds the same candidates' similarities.

Every evaluated candidate is appended to a journal (``<out>.journal.jsonl``) and flushed; a killed search
resumes from it: journaled candidates are not re-run (their stored similarity decides, exactly as it did),
and the fast procedure rebuilds its cached state with one forward of the accepted policy (from its first shared layer
when the search started from the plain run).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .distance import layer_distances, rank_pairs
from .measured import OutputLoss, measured_search
from ..names import FITTED_ORDERS, MEASURED_ORDERS
from ..cache.kv_maps import Fitter, Rope
from ..models.layer_kinds import compatible
from ..cache.prefill import prefill_cache
from ..models.loading import find_parts
from ..cache.policy import SharingPolicy, resolve_chains
from ..cache.sharing import share_kv

PROCEDURES = ("fast", "official")


@dataclass(frozen=True)
class SearchSettings:
    target: int  # number of layers that should share
    threshold: float = 0.5  # accept a candidate when mean similarity > threshold (paper: T = 0.5)
    order: str = "dissimilar"
    metric: str = "euclidean"
    seed: int = 0
    procedure: str = "fast"
    batch_size: int | None = None  # fast procedure: samples per forward (None: all)
    max_candidates: int | None = None  # evaluate at most this many candidates (None: no budget)
    sources: int | None = 3  # measured orders: nearest sources measured per storing layer (None: all)
    refresh: int | None = 8  # measured orders: best-so-far candidates re-measured per step (None: all)
    screen: int | None = None  # measured orders: new pairs first scored on this many samples (None: off)

    def key(self) -> dict:
        """What a journal entry depends on (batch size: float rounding only; the budget and the target only
        say when to stop: a search to 4 layers evaluates exactly the first candidates of one to 8)."""
        skip = ("batch_size", "max_candidates", "target") + (() if self.order in MEASURED_ORDERS else ("sources", "refresh", "screen"))
        return {k: v for k, v in asdict(self).items() if k not in skip}


def target_layers(n_layers: int, rate: float | None = None, count: int | None = None) -> int:
    """Shared-layer target from a rate (round half up of rate × L) or a count, validated."""
    if (rate is None) == (count is None):
        raise ValueError("give exactly one of a sharing rate or a layer count")
    if rate is not None:
        if not 0 <= rate <= (n_layers - 1) / n_layers:
            raise ValueError(
                f"sharing rate {rate} is impossible for {n_layers} layers: it must be in [0, {(n_layers - 1) / n_layers:.4f}] "
                "(at least one layer must store KV)"
            )
        return math.floor(rate * n_layers + 0.5)
    if not 0 <= count <= n_layers - 1:
        raise ValueError(f"{count} shared layers is impossible for {n_layers} layers: it must be in [0, {n_layers - 1}]")
    return count


def check_threshold(threshold: float) -> None:
    if not -1 < threshold <= 1:
        raise ValueError(f"threshold T={threshold} must be in (-1, 1] (it is compared with a cosine similarity)")


def mean_similarity(hidden: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of flattened [T, hidden] states ([N] float64)."""
    a = hidden.reshape(hidden.shape[0], -1).double()
    b = reference.reshape(reference.shape[0], -1).double().to(a.device)
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


# ------------------------------------------------------------------------------------------------
# The two ways of scoring a candidate map
# ------------------------------------------------------------------------------------------------


class OfficialEvaluator:
    """The authors' procedure: reference recomputed per candidate, one sample at a time, full model."""

    def __init__(self, model, input_ids: torch.Tensor):
        self.model, self.input_ids = model, input_ids

    @torch.inference_mode()
    def similarity(self, accepted: list[int], candidate: list[int]) -> float:
        sims = []
        for s in range(self.input_ids.shape[0]):
            sample = self.input_ids[s : s + 1].to(self.model.device)
            reference = self.model(sample, output_hidden_states=True).hidden_states[-1]
            with share_kv(self.model, SharingPolicy(candidate)):
                hidden = self.model(sample, output_hidden_states=True).hidden_states[-1]
            sims.append(mean_similarity(hidden, reference))
        return float(torch.cat(sims).mean())

    def accept(self, candidate: list[int]) -> None:
        pass


class _Replay(nn.Module):
    """Stands in for decoder layer ``idx`` < f: stores the accepted run's K/V and returns its output.

    It answers like the layer it replaces: transformers' layers take ``past_key_values=`` and return a
    tensor; remote code such as InternLM2's takes ``past_key_value=`` and returns a tuple
    ``(hidden, [attentions,] cache)`` whose first item the decoder reads."""

    def __init__(self, idx: int, output: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None,
                 as_tuple: bool = False):
        super().__init__()
        self.idx, self.output, self.kv, self.as_tuple = idx, output, kv, as_tuple

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        cache = past_key_values if past_key_values is not None else kwargs.get("past_key_value")
        if self.kv is not None:
            cache.update(self.kv[0], self.kv[1], self.idx)
        return (self.output, cache) if self.as_tuple else self.output


def _first_change(a: list[int], b: list[int]) -> int:
    """The first layer whose map entry differs between two maps (their length when none does)."""
    return next((k for k in range(len(a)) if a[k] != b[k]), len(a))


class FastEvaluator:
    """Batched, reference from the calibration file, forwards start at the first changed layer."""

    def __init__(self, model, input_ids: torch.Tensor, reference: torch.Tensor, batch_size: int | None = None):
        self.model, self.parts = model, find_parts(model)
        self.input_ids, self.reference = input_ids, reference
        self.batch_size = batch_size or input_ids.shape[0]
        self.state_map: list[int] | None = None  # the map whose per-layer outputs / K/V we hold
        self.outputs: list[torch.Tensor] = []  # [N, T, hidden] output of every layer under state_map
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # K/V stored by every source layer
        self._pending = None
        self.layers_run = 0  # decoder layers actually computed (for the benchmark)
        self.tuple_outputs = False  # do the model's decoder layers return tuples (remote code)?
        self.fit = None  # share map -> its fitted K/V maps (the fitted order; None: plain sharing)

    @torch.inference_mode()
    def _run(self, share_map: list[int], first: int, keep: bool, samples: int | None = None):
        """Forward of ``share_map`` from layer ``first`` on (over the first ``samples`` calibration samples, default
        all); returns (last hidden, outputs, kv) for layers >= first."""
        samples = self.input_ids.shape[0] if samples is None else samples
        n_layers, layers = self.parts.n_layers, self.parts.layers
        originals = list(layers)
        captured: dict[int, list[torch.Tensor]] = {k: [] for k in range(first, n_layers)}
        kv: dict[int, list] = {k: [] for k in range(first, n_layers) if share_map[k] == k and self.parts.kinds[k].has_kv}
        hooks = []
        if keep:
            for k in range(first, n_layers):
                hooks.append(originals[k].register_forward_hook(lambda mod, args, out, k=k: self._capture(captured[k], out)))
        last = []
        try:
            with share_kv(self.model, SharingPolicy(share_map), None if self.fit is None else self.fit(share_map)):
                for start in range(0, samples, self.batch_size):
                    rows = slice(start, min(start + self.batch_size, samples))
                    for k in range(first):  # shortcut 3: replay the layers before the first change
                        layers[k] = _Replay(k, self.outputs[k][rows], (self.kv[k][0][rows], self.kv[k][1][rows]) if self.kv[k] else None,
                                            self.tuple_outputs)
                    out = self.parts.decoder(input_ids=self.input_ids[rows].to(self.model.device), use_cache=True,
                                             past_key_values=prefill_cache(self.model.config))  # shortcut 4
                    last.append(out.last_hidden_state)
                    if keep:
                        for k in kv:
                            kv[k].append((out.past_key_values.layers[k].keys, out.past_key_values.layers[k].values))
        finally:
            for k in range(first):
                layers[k] = originals[k]
            for h in hooks:
                h.remove()
        self.layers_run += (n_layers - first) * samples
        outputs = {k: torch.cat(v) for k, v in captured.items()} if keep else {}
        kv_cat = {k: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for k, v in kv.items()} if keep else {}
        return torch.cat(last), outputs, kv_cat

    def _capture(self, into: list, out) -> None:
        self.tuple_outputs = isinstance(out, tuple)
        into.append(out[0] if self.tuple_outputs else out)

    def _commit(self, share_map, first, outputs, kv) -> None:
        n_layers = self.parts.n_layers
        if first == 0:
            self.outputs, self.kv = [None] * n_layers, [None] * n_layers
        for k in range(first, n_layers):
            self.outputs[k] = outputs[k]
            self.kv[k] = kv.get(k)
        self.state_map = list(share_map)

    def start_from(self, outputs: list[torch.Tensor], kv: list[tuple[torch.Tensor, torch.Tensor]],
                   tuple_outputs: bool = False) -> None:
        """Hold the plain model's run (:func:`plain_run`, on these calibration samples) as this evaluator's
        state, instead of computing it at the first candidate. ``tuple_outputs``: the model's decoder layers
        return tuples (remote code), as that run saw."""
        n_layers = self.parts.n_layers
        if len(outputs) != n_layers or len(kv) != n_layers:
            raise ValueError(f"a plain run of {len(outputs)} layers does not fit a model of {n_layers}")
        if outputs[0].shape[0] != self.input_ids.shape[0]:
            raise ValueError(f"a plain run on {outputs[0].shape[0]} samples does not fit {self.input_ids.shape[0]}")
        # each layer's state on that layer's device (a file is read to the CPU; a model may span GPUs)
        devices = [next(layer.parameters()).device for layer in self.parts.layers]
        self.outputs = [out.to(dev) for out, dev in zip(outputs, devices)]
        self.kv = [(key.to(dev), value.to(dev)) for (key, value), dev in zip(kv, devices)]
        self.state_map, self.tuple_outputs = list(range(n_layers)), tuple_outputs

    def hidden(self, accepted: list[int], candidate: list[int], keep: bool = True,
               samples: int | None = None) -> torch.Tensor:
        """Last hidden state [N, T, hidden] of ``candidate``, replaying the layers before its first change
        from ``accepted``. ``keep``: hold its per-layer state so that ``accept(candidate)`` costs nothing.
        ``samples``: only the first ``samples`` calibration samples ([samples, T, hidden]; not kept)."""
        if samples is not None and keep:
            raise ValueError("a candidate measured on part of the samples cannot be kept")
        if self.state_map != accepted:  # first call, or after resuming from a journal: one forward of the accepted
            # map, from the first layer where it differs from the state held (none held: from layer 0)
            first = 0 if self.state_map is None else _first_change(self.state_map, accepted)
            _, outputs, kv = self._run(accepted, first, keep=True)
            self._commit(accepted, first, outputs, kv)
        first = _first_change(candidate, accepted)
        last, outputs, kv = self._run(candidate, first, keep=keep, samples=samples)
        self._pending = (list(candidate), first, outputs, kv) if keep else None
        return last

    def similarity(self, accepted: list[int], candidate: list[int]) -> float:
        last = self.hidden(accepted, candidate)
        return float(mean_similarity(last, self.reference).mean())  # shortcut 1: stored reference

    def accept(self, candidate: list[int]) -> None:
        """The search moves on from ``candidate``: its state is taken if it was kept. Otherwise (measured on part
        of the samples, or answered from a journal) the state held stays that of ``state_map``, and the next
        candidate rebuilds it from the first layer where the two maps differ: one forward for any number of
        accepted candidates a resumed search replays from its journal."""
        if self._pending is not None and self._pending[0] == candidate:
            self._commit(candidate, self._pending[1], self._pending[2], self._pending[3])
        self._pending = None


def plain_run(model, input_ids: torch.Tensor, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """The plain model's run on the calibration samples, layer by layer, as the fast search computes it:
    ``output.<k>`` [N, T, hidden] (decoder layer k's output) and ``keys.<k>``/``values.<k>`` [N, kv_heads, T,
    head_dim] (the K/V it stores) for every layer k, and ``tuple_outputs`` [1] (1: the layers return tuples).
    ``batch_size``: the search's (float rounding depends on it)."""
    evaluator = FastEvaluator(model, input_ids, reference=None, batch_size=batch_size)
    identity = list(range(evaluator.parts.n_layers))
    _, outputs, kv = evaluator._run(identity, 0, keep=True)
    tensors = {f"output.{k}": v.contiguous() for k, v in outputs.items()}
    for k, (keys, values) in kv.items():
        tensors[f"keys.{k}"], tensors[f"values.{k}"] = keys.contiguous(), values.contiguous()
    tensors["tuple_outputs"] = torch.tensor([int(evaluator.tuple_outputs)])
    return tensors


def unpack_plain_run(tensors: dict[str, torch.Tensor]) -> tuple[list, list, bool]:
    """(outputs, kv, tuple_outputs) per layer from :func:`plain_run`'s tensors (as read back from its file)."""
    n_layers = sum(1 for name in tensors if name.startswith("output."))
    stored = [k for k in range(n_layers) if f"keys.{k}" in tensors and f"values.{k}" in tensors]
    if not n_layers or not stored:  # layers without K/V (Mamba / linear attention) have none
        raise ValueError(f"not a plain run: {n_layers} layer outputs, K/V for {len(stored)} layers")
    return ([tensors[f"output.{k}"] for k in range(n_layers)],
            [(tensors[f"keys.{k}"], tensors[f"values.{k}"]) if k in stored else None for k in range(n_layers)],
            bool(tensors["tuple_outputs"].item()) if "tuple_outputs" in tensors else False)


# ------------------------------------------------------------------------------------------------
# The greedy loop, with its journal
# ------------------------------------------------------------------------------------------------


class Journal:
    """The evaluated candidates of a search by rank, and where each new one goes.

    ``lines``: a journal read back, header first (the stage ``search`` reads and rewrites the journal file,
    :func:`kvsharer.stages.search.open_journal`); ``sink``: called with every newly evaluated entry (the
    stage appends it to the file and syncs it; None: kept nowhere); ``path``: named in errors only."""

    def __init__(self, header: dict, lines: list[dict] | None = None, sink: Callable[[dict], None] | None = None,
                 path: Path | None = None):
        self.path, self.header, self.sink = path, header, sink
        self.entries = {e["rank"]: e for e in (lines or [])[1:] if "rank" in e}
        # the fitted order's pair ranking ((i, j, score) by score), recorded once: the same search to a larger target
        # starts from this journal and skips the fit of every pair
        self.ranking = next(([tuple(p) for p in e["ranking"]] for e in (lines or [])[1:] if "ranking" in e), None)

    def append(self, entry: dict) -> None:
        if self.sink is not None:
            self.sink(entry)

    def record_ranking(self, ranking: list[tuple[int, int, float]]) -> None:
        self.ranking = ranking
        self.append({"ranking": [list(p) for p in ranking]})


def journal_header(settings: SearchSettings, calibration_hash: str, n_layers: int) -> dict:
    """The first line of a search's journal: what its entries depend on (settings and inputs)."""
    return {**settings.key(), "calibration_sha256": calibration_hash, "n_layers": n_layers}


def greedy_search(
    ranked: list[tuple[int, int, float]],
    n_layers: int,
    target: int,
    threshold: float,
    evaluator,
    journal: Journal | None = None,
    progress: bool = True,
    max_candidates: int | None = None,
    keep_pairs: bool = False,
) -> dict:
    """The KVSharer loop over ``ranked`` pairs; returns map, completeness, trace and counts.

    ``max_candidates`` (optional) caps how many candidates are evaluated: a time budget for high
    thresholds, where the paper's loop may try every pair. The result then says ``stopped: budget``.
    ``keep_pairs``: also skip a pair whose source j already shares or whose layer i is already a source, so no
    chain is ever resolved and every sharing layer reads the very layer its pair names (the fitted order: its
    maps were fitted for that pair).
    """
    journal = journal or Journal({})
    accepted = list(range(n_layers))
    trace, evaluated, resumed, skipped = [], 0, 0, 0
    bar = tqdm(total=target, desc="search", unit="layer", disable=not progress, leave=False)
    stopped = "pairs exhausted"
    for rank, (i, j, distance) in enumerate(ranked):
        if sum(1 for k, s in enumerate(accepted) if s != k) >= target:
            stopped = "target reached"
            break
        if max_candidates is not None and len(trace) >= max_candidates:
            stopped = "budget"
            break
        if accepted[i] != i or (keep_pairs and (accepted[j] != j or any(s == i != k for k, s in enumerate(accepted)))):
            skipped += 1
            continue
        candidate = list(accepted)
        candidate[i] = j
        candidate = resolve_chains(candidate)
        if rank in journal.entries:
            entry = journal.entries[rank]
            if entry["pair"] != [i, j] or entry["map"] != candidate:
                raise RuntimeError(f"journal {journal.path} disagrees with this search at rank {rank}; delete it to start over")
            resumed += 1
        else:
            start, layers = time.perf_counter(), getattr(evaluator, "layers_run", 0)
            sim = evaluator.similarity(accepted, candidate)
            entry = {"rank": rank, "pair": [i, j], "distance": distance, "similarity": sim,
                     "accepted": sim > threshold, "map": candidate, "seconds": time.perf_counter() - start,
                     "layers": getattr(evaluator, "layers_run", 0) - layers}
            journal.append(entry)
            evaluated += 1
        trace.append({k: entry.get(k) for k in ("rank", "pair", "distance", "similarity", "accepted", "seconds", "layers")})
        if entry["accepted"]:
            evaluator.accept(candidate)
            accepted = candidate
            bar.update(1)
        bar.set_postfix(rank=rank, sim=f"{entry['similarity']:.3f}")
    bar.close()
    shared = sum(1 for k, s in enumerate(accepted) if s != k)
    if shared >= target:
        stopped = "target reached"
    return {"map": accepted, "complete": shared >= target, "num_shared": shared, "target": target,
            "stopped": stopped, "trace": trace,
            "candidates_evaluated": evaluated, "candidates_resumed": resumed, "pairs_skipped": skipped,
            "pairs_total": len(ranked)}


def run_search(model, stats: dict, settings: SearchSettings, journal: Journal | None = None,
               progress: bool = True, start: dict[str, torch.Tensor] | None = None) -> dict:
    """Distances, ranking and the greedy loop for a loaded model and calibration tensors.

    ``journal``: the candidates already evaluated (not re-run) and where new ones are recorded (see
    :func:`journal_header`; the stage keeps it in a file that a killed search resumes from).
    ``start``: the plain model's run on the same samples (:func:`plain_run`), from which the fast procedure
    starts instead of computing it (ignored by the official procedure, which recomputes everything)."""
    dist = layer_distances(stats["keys"], stats["values"], settings.metric)
    began = time.perf_counter()

    def fast() -> FastEvaluator:
        evaluator = FastEvaluator(model, stats["input_ids"], stats["reference_hidden"], settings.batch_size)
        if start is not None:
            evaluator.start_from(*unpack_plain_run(start))
        return evaluator

    if settings.order in MEASURED_ORDERS:
        if settings.procedure != "fast":
            raise ValueError(f"order {settings.order!r} measures candidates with the fast procedure only")
        evaluator = fast()
        result = measured_search(dist, settings.target, settings.threshold, evaluator,
                                 OutputLoss(model, stats["reference_hidden"]), MEASURED_ORDERS[settings.order],
                                 settings.sources, settings.refresh, journal, progress,
                                 settings.max_candidates, settings.screen, evaluator.parts.kinds)
        return _costs(result, began, evaluator, dist.shape[0])
    if settings.order in FITTED_ORDERS:
        if settings.procedure != "fast":
            raise ValueError(f"order {settings.order!r} evaluates candidates with the fast procedure only")
        evaluator = fast()
        if start is None:  # the fit reads the plain model's K/V on the calibration samples
            evaluator.start_from(*unpack_plain_run(plain_run(model, stats["input_ids"], settings.batch_size)))
        fitter = Fitter(evaluator.kv, Rope(model))
        kinds = evaluator.parts.kinds
        journal = journal or Journal({})
        ranked = journal.ranking
        if ranked is None:
            ranked = fitter.ranking([(i, j) for i in range(1, len(kinds)) for j in range(i)
                                     if kinds[i].has_kv and compatible(kinds, i, j)])
            journal.record_ranking(ranked)
        evaluator.fit = fitter.maps
        result = greedy_search(ranked, dist.shape[0], settings.target, settings.threshold, evaluator,
                               journal, progress, settings.max_candidates, keep_pairs=True)
        result["kv_maps"] = fitter.maps(result["map"])
        return _costs(result, began, evaluator, dist.shape[0])
    ranked = rank_pairs(dist, settings.order, settings.seed, find_parts(model).kinds)
    if settings.procedure == "official":
        evaluator = OfficialEvaluator(model, stats["input_ids"])
    elif settings.procedure == "fast":
        evaluator = fast()
    else:
        raise ValueError(f"unknown procedure {settings.procedure!r}; choose one of {', '.join(PROCEDURES)}")
    result = greedy_search(ranked, dist.shape[0], settings.target, settings.threshold, evaluator,
                           journal, progress, settings.max_candidates)
    return _costs(result, began, evaluator, dist.shape[0])


def _costs(result: dict, start: float, evaluator, n_layers: int) -> dict:
    """Seconds, and decoder layers computed (also as full forwards over all samples), into ``result``."""
    result["seconds"] = time.perf_counter() - start
    result["seconds_per_candidate"] = result["seconds"] / max(result["candidates_evaluated"], 1)
    result["layers_computed"] = getattr(evaluator, "layers_run", None)
    samples = evaluator.input_ids.shape[0]
    result["forwards"] = None if result["layers_computed"] is None else result["layers_computed"] / (n_layers * samples)
    # what finding this policy cost from scratch, candidates taken from a journal included
    result["candidate_seconds_total"] = sum(t["seconds"] or 0.0 for t in result["trace"])
    layers = [t.get("layers") for t in result["trace"]]
    result["candidate_forwards_total"] = (sum(layers) / (n_layers * samples)
                                          if layers and all(x is not None for x in layers) else None)
    return result
