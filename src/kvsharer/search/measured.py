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
from ..models.layer_kinds import LayerKind, compatible

OBJECTIVES = ("kl", "cosine")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown search objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


class OutputLoss:
    """Losses of a candidate's last hidden state [n, T, H] against the plain model's on the same tokens (the
    first n calibration samples: a screening pass may score a prefix of them).

    KL(p || q) per token is ``sum_v p_v log p_v - sum_v p_v z_v + logsumexp(z)`` for the candidate's logits
    ``z = h W^T + b``; the first two sums need no candidate logits, since ``sum_v p_v z_v = h . (p W) + p . b``.
    The plain model's part (``p log p``, ``p W``, ``p . b``) is computed once, so a candidate costs its LM-head
    matmul and one logsumexp (no log-softmax, exp or product over the vocabulary). Logits in float32, the
    plain model's part and the sums in float64, whatever the model's dtype."""

    def __init__(self, model, reference: torch.Tensor, chunk: int = 4):
        head = model.get_output_embeddings()
        self.weight = head.weight.detach().float()  # [V, H]
        self.bias = None if getattr(head, "bias", None) is None else head.bias.detach().float()  # [V]
        self.reference, self.chunk = reference, chunk  # [N, T, H] after the final norm
        self._plain: tuple[torch.Tensor, torch.Tensor] | None = None  # sum p log p [N] and p W [N, T, H], float64

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self.weight.device, torch.float32), self.weight, self.bias)  # [n, T, V]

    @torch.inference_mode()
    def _plain_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._plain is None:
            entropy, weighted = [], []
            weight = self.weight.double()  # float64: p W sums V terms, and KL is a small difference of large sums
            for s in range(0, self.reference.shape[0], self.chunk):
                logp = F.log_softmax(self._logits(self.reference[s : s + self.chunk]).double(), dim=-1)  # [n, T, V]
                p = logp.exp()
                plogp = (p * logp).sum(dim=(1, 2))  # [n]
                pw = p @ weight  # [n, T, H]
                if self.bias is not None:  # the p . b part of sum p z does not depend on the candidate
                    plogp = plogp - (p @ self.bias.double()).sum(dim=1)
                entropy.append(plogp)
                weighted.append(pw)
            self._plain = torch.cat(entropy), torch.cat(weighted)
        return self._plain

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> dict[str, float]:
        n = hidden.shape[0]
        a = hidden.reshape(n, -1).double()  # [n, T*H]
        b = self.reference[:n].reshape(n, -1).double().to(a.device)
        cosine = float(F.cosine_similarity(a, b, dim=1).mean())
        plogp, pw = self._plain_terms()
        kl_sum = float(plogp[:n].sum())
        for s in range(0, n, self.chunk):
            h = hidden[s : s + self.chunk]
            lse = torch.logsumexp(self._logits(h), dim=-1)  # [n, T]
            cross = (h.to(pw.device, torch.float64) * pw[s : s + h.shape[0]]).sum(-1)  # sum_v p_v h.W_v: [n, T]
            kl_sum += float((lse.double() - cross).sum())  # KL(plain || candidate), summed over tokens
        return {"cosine": cosine, "kl": kl_sum / (n * hidden.shape[1])}


def loss_of(scores: dict[str, float], objective: str) -> float:
    return scores["kl"] if objective == "kl" else 1.0 - scores["cosine"]


def candidate_pairs(accepted: list[int], dist: torch.Tensor, sources: int | None,
                    kinds: list[LayerKind] | None = None) -> list[tuple[int, int]]:
    """(i, j) for every storing layer i and its ``sources`` nearest storing layers j < i of the same attention
    kind (``kinds``, None: all layers alike), by (i, distance, j)."""
    storing = [k for k, s in enumerate(accepted) if s == k]
    pairs = []
    for i in storing:
        near = sorted((float(dist[i, j]), j) for j in storing if j < i and (kinds is None or compatible(kinds, i, j)))
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
    screen: int | None = None,
    kinds: list[LayerKind] | None = None,
) -> dict:
    """Greedy over measured candidates; returns map, completeness, trace and counts like ``greedy_search``.

    ``screen`` (with ``refresh``): a pair never measured is first scored on the first ``screen`` calibration
    samples only; each step then measures on all samples the ``refresh`` pairs with the lowest loss known
    (screened or measured) and takes the best of those.

    ``evaluator`` is a :class:`kvsharer.search.greedy.FastEvaluator`; ``journal`` a :class:`kvsharer.search.greedy.Journal`.
    """
    check_objective(objective)
    n_layers = dist.shape[0]
    entries = journal.entries if journal is not None else {}
    accepted = list(range(n_layers))
    measured: dict[tuple[int, int], float] = {}  # pair (i, j) -> loss at its latest measurement
    trace, evaluated, resumed, screened, count = [], 0, 0, 0, 0
    stopped = "target reached"
    bar = tqdm(total=target, desc="measured search", unit="layer", disable=not progress, leave=False)

    def measure(i: int, j: int, candidate: list[int], samples: int | None = None) -> dict:
        nonlocal evaluated, resumed, screened, count
        screened += samples is not None
        if count in entries:
            entry = entries[count]
            if entry["pair"] != [i, j] or entry["map"] != candidate or entry.get("samples") != samples:
                raise RuntimeError(f"journal {journal.path} disagrees with this search at measurement {count}; "
                                   "delete it to start over")
            resumed += 1
        else:
            start, layers = time.perf_counter(), getattr(evaluator, "layers_run", 0)
            scores = loss(evaluator.hidden(accepted, candidate, keep=False, **({"samples": samples} if samples else {})))
            entry = {"rank": count, "pair": [i, j], "distance": float(dist[i, j]), "similarity": scores["cosine"],
                     "kl": scores["kl"], "loss": loss_of(scores, objective), "map": candidate,
                     "step": sum(1 for k, s in enumerate(accepted) if s != k), "seconds": time.perf_counter() - start,
                     "layers": getattr(evaluator, "layers_run", 0) - layers, "samples": samples}
            if journal is not None:
                journal.append(entry)
            evaluated += 1
        count += 1
        return entry

    while sum(1 for k, s in enumerate(accepted) if s != k) < target:
        pairs = candidate_pairs(accepted, dist, sources, kinds)
        maps = {p: resolve_chains([p[1] if k == p[0] else s for k, s in enumerate(accepted)]) for p in pairs}
        if not pairs:
            stopped = "pairs exhausted"
            break
        fresh = [p for p in pairs if p not in measured]
        screening = bool(screen is not None and refresh is not None and fresh)
        if screening:  # a cheap first score of the new pairs: which are worth measuring in full
            planned = len(fresh) + refresh
        elif refresh is None or not measured:
            planned = len(pairs)
        else:
            planned = len(set(fresh) | set(sorted(pairs, key=lambda p: (measured.get(p, float("inf")), p))[:refresh]))
        if max_candidates is not None and len(trace) + planned > max_candidates:
            stopped = "budget"
            break
        for i, j in fresh if screening else ():
            entry = measure(i, j, maps[(i, j)], samples=screen)
            measured[(i, j)] = entry["loss"]
            trace.append(_trace_entry(entry))
        stale = sorted(pairs, key=lambda p: (measured.get(p, float("inf")), p))
        fresh = [p for p in pairs if p not in measured]
        if refresh is None or not measured:
            todo = pairs
        else:
            todo = list(dict.fromkeys(stale[:refresh] + fresh))
        step, done = [], set()
        while todo:
            done.update(todo)
            for i, j in todo:
                entry = measure(i, j, maps[(i, j)])
                measured[(i, j)] = entry["loss"]
                step.append(entry)
                trace.append(_trace_entry(entry))
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
            "candidates_evaluated": evaluated, "candidates_resumed": resumed, "candidates_screened": screened,
            "pairs_skipped": 0,
            "pairs_total": len(trace)}


def _trace_entry(entry: dict) -> dict:
    return {k: entry.get(k) for k in ("rank", "pair", "distance", "similarity", "kl", "loss", "seconds", "layers",
                                      "samples")} | {"accepted": False}
