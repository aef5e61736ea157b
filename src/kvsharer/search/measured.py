"""Measured greedy search: every step measures candidate pairs on the model's output and takes the best.

The paper's loop walks a fixed ranking of layer pairs (a proxy: K/V distance on calibration data) and
accepts every candidate whose last-hidden cosine clears T — at T = 0.5 that is every candidate, so the
policy is "the first pairs of the ranking". This procedure instead *measures*:

1. candidates: for every layer i that still stores its K/V, its ``sources`` nearest storing layers j < i by
   the calibration K/V distance (the proxy only prunes what is measured; ``sources=None`` keeps them all);
2. each candidate (accepted map with i → j, chains resolved) runs on the calibration samples — with the
   fast evaluator's replay it costs only the layers from i on — and is scored by an ``objective`` on the
   model's output: ``kl``, the mean KL divergence of the candidate's next-token distribution from the
   plain model's on every calibration token, or ``cosine``, the paper's flattened last-hidden cosine
   (as a loss: 1 − similarity);
3. among the candidates whose cosine similarity is > T (T keeps the paper's meaning: a candidate below
   it is never accepted), the one with the lowest loss is taken, and the next step starts from it. Stop
   at the target number of shared layers, or when no candidate clears T (``stopped: threshold``).

``refresh`` makes it lazy: the first step measures every candidate; a later step re-measures only the
``refresh`` candidates with the lowest loss measured so far (plus any never measured) and takes the best of
those, since one accepted pair barely changes how the others rank (when none of those clears T, the rest
are measured before the search concludes that none does). ``refresh=None`` re-measures all.

Every measured candidate is appended to the same journal as the paper's loop (entry ``rank`` = the
measurement's index); a killed search replays the journal's losses and reaches the same policy.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..cache.policy import resolve_chains

OBJECTIVES = ("kl", "cosine")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown search objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


class OutputLoss:
    """Losses of a candidate's last hidden state [N, T, H] against the plain model's, on the same tokens."""

    def __init__(self, model, reference: torch.Tensor, chunk: int = 4):
        self.head = model.get_output_embeddings()
        self.reference, self.chunk = reference, chunk  # [N, T, H] after the final norm
        self._ref_logp: list[torch.Tensor] | None = None  # per chunk of samples: [n, T, V] log-probs

    @torch.inference_mode()
    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden.to(self.head.weight.device, self.head.weight.dtype))  # [n, T, V]
        return F.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> dict[str, float]:
        a = hidden.reshape(hidden.shape[0], -1).double()  # [N, T*H]
        b = self.reference.reshape(self.reference.shape[0], -1).double().to(a.device)
        cosine = float(F.cosine_similarity(a, b, dim=1).mean())
        if self._ref_logp is None:
            self._ref_logp = [self._log_probs(self.reference[s : s + self.chunk])
                              for s in range(0, self.reference.shape[0], self.chunk)]
        kl_sum, tokens = 0.0, 0
        for c, s in enumerate(range(0, hidden.shape[0], self.chunk)):
            ref = self._ref_logp[c]  # [n, T, V]
            cand = self._log_probs(hidden[s : s + self.chunk])
            kl_sum += float((ref.exp() * (ref - cand)).sum(dtype=torch.float64))  # KL(plain || candidate)
            tokens += ref.shape[0] * ref.shape[1]
        return {"cosine": cosine, "kl": kl_sum / tokens}


def loss_of(scores: dict[str, float], objective: str) -> float:
    return scores["kl"] if objective == "kl" else 1.0 - scores["cosine"]


def candidate_pairs(accepted: list[int], dist: torch.Tensor, sources: int | None) -> list[tuple[int, int]]:
    """(i, j) for every storing layer i and its ``sources`` nearest storing layers j < i, by (i, distance, j)."""
    storing = [k for k, s in enumerate(accepted) if s == k]
    pairs = []
    for i in storing:
        near = sorted((float(dist[i, j]), j) for j in storing if j < i)
        pairs += [(i, j) for _, j in (near if sources is None else near[:sources])]
    return pairs


def measured_search(
    dist: torch.Tensor,
    target: int,
    threshold: float,
    evaluator,
    loss: OutputLoss,
    objective: str = "kl",
    sources: int | None = 3,
    refresh: int | None = 8,
    journal=None,
    progress: bool = True,
    max_candidates: int | None = None,
) -> dict:
    """Greedy over measured candidates; returns map, completeness, trace and counts like ``greedy_search``.

    ``evaluator`` is a :class:`kvsharer.search.greedy.FastEvaluator`; ``journal`` a :class:`kvsharer.search.greedy.Journal`.
    """
    check_objective(objective)
    n_layers = dist.shape[0]
    entries = journal.entries if journal is not None else {}
    accepted = list(range(n_layers))
    measured: dict[tuple[int, int], float] = {}  # pair (i, j) -> loss at its latest measurement
    trace, evaluated, resumed, count = [], 0, 0, 0
    stopped = "target reached"
    bar = tqdm(total=target, desc="measured search", unit="layer", disable=not progress, leave=False)

    def measure(i: int, j: int, candidate: list[int]) -> dict:
        nonlocal evaluated, resumed, count
        if count in entries:
            entry = entries[count]
            if entry["pair"] != [i, j] or entry["map"] != candidate:
                raise RuntimeError(f"journal {journal.path} disagrees with this search at measurement {count}; "
                                   "delete it to start over")
            resumed += 1
        else:
            start, layers = time.perf_counter(), getattr(evaluator, "layers_run", 0)
            scores = loss(evaluator.hidden(accepted, candidate, keep=False))
            entry = {"rank": count, "pair": [i, j], "distance": float(dist[i, j]), "similarity": scores["cosine"],
                     "kl": scores["kl"], "loss": loss_of(scores, objective), "map": candidate,
                     "step": sum(1 for k, s in enumerate(accepted) if s != k), "seconds": time.perf_counter() - start,
                     "layers": getattr(evaluator, "layers_run", 0) - layers}
            if journal is not None:
                journal.append(entry)
            evaluated += 1
        count += 1
        return entry

    while sum(1 for k, s in enumerate(accepted) if s != k) < target:
        pairs = candidate_pairs(accepted, dist, sources)
        maps = {p: resolve_chains([p[1] if k == p[0] else s for k, s in enumerate(accepted)]) for p in pairs}
        if not pairs:
            stopped = "pairs exhausted"
            break
        stale = sorted(pairs, key=lambda p: (measured.get(p, float("inf")), p))
        fresh = [p for p in pairs if p not in measured]
        if refresh is None or not measured:
            todo = pairs
        else:
            todo = list(dict.fromkeys(stale[:refresh] + fresh))
        if max_candidates is not None and len(trace) + len(todo) > max_candidates:
            stopped = "budget"
            break
        step, done = [], set()
        while todo:
            done.update(todo)
            for i, j in todo:
                entry = measure(i, j, maps[(i, j)])
                measured[(i, j)] = entry["loss"]
                step.append(entry)
                trace.append({k: entry.get(k) for k in ("rank", "pair", "distance", "similarity", "kl", "loss", "seconds",
                                                        "layers")} | {"accepted": False})
            passing = [s for s in range(len(step)) if step[s]["similarity"] > threshold]
            # none of the re-measured ones clears T: measure the rest before concluding that none does
            todo = [] if passing else [p for p in pairs if p not in done]
        if not passing:
            stopped = "threshold"
            break
        best = min(passing, key=lambda s: (step[s]["loss"], step[s]["rank"]))
        trace[len(trace) - len(step) + best]["accepted"] = True
        accepted = list(step[best]["map"])
        evaluator.accept(accepted)
        bar.update(1)
        bar.set_postfix(pair="{}->{}".format(*step[best]["pair"]), loss=f"{step[best]['loss']:.4f}")
    bar.close()
    shared = sum(1 for k, s in enumerate(accepted) if s != k)
    return {"map": accepted, "complete": shared >= target, "num_shared": shared, "target": target,
            "stopped": "target reached" if shared >= target else stopped, "trace": trace,
            "candidates_evaluated": evaluated, "candidates_resumed": resumed, "pairs_skipped": 0,
            "pairs_total": len(trace)}
