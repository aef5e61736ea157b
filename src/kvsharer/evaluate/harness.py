"""lm-eval harness accuracy under a sharing policy (stage ``evaluate-harness``,
:mod:`kvsharer.stages.evaluate_harness`).

The lm-evaluation-harness does all the scoring: ``simple_evaluate`` runs on an ``HFLM`` that wraps the
already loaded model, inside ``share_kv(model, policy)``. Nothing here re-implements it. With a cache
method (``--cache``), ``ScoringHFLM`` only changes how the logits are computed: each batch goes through
one cache, the context as one prefill that the method then compresses and the scored tokens in chunks of
``--chunk``, so the continuation is scored from the compressed cache (without one, it computes only the
logits lm-eval scores).

Task names are checked against lm-eval's registry (plus ``--task-dir``) before the model is loaded. On a
cluster the paper's tasks are named directly (hellaswag, piqa, ...; their datasets come from the hub).
Offline, ``make-tasks`` builds local tasks from the held-out text; when every requested name is found in
``--task-dir`` the stage sets ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` (unless already set), since
such tasks only read local JSON files.

lm-eval's RULER tasks that generate their data offline (niah_single_1, niah_multikey_2, ruler_vt, ...;
see :mod:`kvsharer.evaluate.ruler`) run at the lengths of ``--max-seq-lengths``, one lm-eval evaluation
per length (``--limit`` counts per length); their result carries RULER's own score (not ``acc``) overall
and per length. RULER tasks that download their data are refused before the model loads; the others'
samples are generated once per length before it loads, and refused there when a task's prompt leaves them no
expected answer (:mod:`kvsharer.evaluate.ruler_samples`).
"""

from __future__ import annotations

import time
from pathlib import Path

from .lm_tasks import task_needs
from .scores import flatten_metrics, requested_scores
from .ruler import ruler_metrics


def task_manager_for(names: list[str], task_dir: Path | None):
    """``(TaskManager that knows every name, whether all names are local)``, or ValueError naming the
    unknown ones. The task folder is indexed first; lm-eval's own registry (~15k names, a few seconds to
    scan) only when a name is not found there."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local, True
    manager = TaskManager(include_path=str(task_dir) if task_dir is not None else None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" nor in --task-dir {task_dir}" if task_dir is not None else " (local tasks need --task-dir)"
        raise ValueError(f"unknown lm-eval task name(s): {', '.join(unknown)}; not in lm-eval's registry{where}")
    return manager, False


def metric_label(manager):
    """``label(task, metric)``: how a table names a task's metric. A unitxt task (xsum) reports each unitxt
    metric under its catalog name (``rouge``) with the metric's main score as the value: the label is that
    main score (``rougeL``), read from unitxt's catalog."""
    def label(task: str, metric: str) -> str:
        entry = manager.task_index.get(task)
        if entry is None or entry.yaml_path is None or Path(entry.yaml_path).parent.name != "unitxt":
            return metric
        try:
            from unitxt.artifact import fetch_artifact

            return getattr(fetch_artifact(f"metrics.{metric}")[0], "main_score", None) or metric
        except Exception:  # unitxt missing or no such catalog entry: the metric's own name
            return metric

    return label


def task_results(out: dict) -> dict:
    """``{task: flattened metrics + samples, samples_total}`` of one ``simple_evaluate`` output."""
    counts = out.get("n-samples", {})
    return {
        name: {**flatten_metrics(metrics),
               "samples": counts.get(name, {}).get("effective"),
               "samples_total": counts.get(name, {}).get("original")}
        for name, metrics in out["results"].items()
    }


def scoring_lm(hflm_class, chunk: int | None):
    """A subclass of lm-eval's ``hflm_class`` whose ``_model_call`` computes only the logits lm-eval may
    score: from the first position any row of the batch scores on (earlier positions are never read; the
    shorter logits are what lm-eval's slicing expects of a model with virtual tokens). With a cache method
    (``chunk`` an int) the tokens before that position go through one cache as one prefill, which the method
    then compresses, and the rest in chunks of ``chunk``: every scored token is predicted from the
    compressed context, as after a real prompt's prefill (kvpress scores the same way). A rolling
    log-likelihood scores every token and so streams everything in chunks. At batch size 1 (nothing to
    batch) requests are scored per context instead: the context prefilled once (and compressed), each
    continuation from a copy of that cache (:mod:`kvsharer.evaluate.shared_context`)."""
    from .streaming import first_scored_position, scored_logits

    class ScoringHFLM(hflm_class):
        longest_continuation: int | None = None  # of the requests being scored (None: unknown)

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            # requests: [((context, continuation), context tokens, continuation tokens)]
            if self.batch_size == 1 and self.backend == "causal" and \
                    all(len(ctx) + len(cont) <= self.max_length + 1 for _, ctx, cont in requests):
                return self._by_context(requests, disable=kwargs.get("disable_tqdm", bool(args and args[0])))
            self.longest_continuation = max((len(r[2]) for r in requests), default=None)
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self.longest_continuation = None

        def _by_context(self, requests, disable: bool) -> list[tuple[float, bool]]:
            """One prefill per distinct context, every continuation of it scored from that cache
            (:func:`kvsharer.evaluate.shared_context.score_continuations`)."""
            from tqdm import tqdm

            from ..cache.hooks import attached_methods
            from .shared_context import score_continuations, shared_objects

            keep = shared_objects(self.model, attached_methods(self.model))
            by_context: dict[tuple, list[int]] = {}
            for i, (_, ctx, _) in enumerate(requests):
                by_context.setdefault(tuple(ctx), []).append(i)
            results: list = [None] * len(requests)
            for ctx, indices in tqdm(by_context.items(), disable=disable or self.rank != 0,
                                     desc=f"Scoring {len(requests)} continuations of {len(by_context)} contexts"):
                answers = score_continuations(self.model, ctx, [requests[i][2] for i in indices], keep, chunk)
                for i, answer in zip(indices, answers):
                    results[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            return results

        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None:  # seq2seq: not a decoder-only cache
                if chunk is not None:
                    raise ValueError("--cache streams decoder-only models only")
                return super()._model_call(inps, attn_mask, labels)
            # lm-eval pads a batch on the right with zeros (pad_and_concat)
            return scored_logits(self.model, inps, first_scored_position(inps, self.longest_continuation), chunk)

    return ScoringHFLM


def evaluate_tasks(lm, other_names: list[str], task_manager, ruler_tasks: dict[int, tuple], limit: int | None,
                   num_fewshot: int | None) -> tuple[dict, dict, dict]:
    """``(tasks, scores, seconds by RULER length)`` of lm-eval model ``lm`` on ``other_names`` (known to
    ``task_manager``) and on the RULER tasks built per length by
    :func:`kvsharer.evaluate.ruler_samples.build_ruler_tasks` (``{length: (TaskManager, {name: Task})}``).
    Run it inside the setting it evaluates."""
    from lm_eval.evaluator import simple_evaluate

    def evaluate(task_names: list, manager) -> dict:
        return simple_evaluate(model=lm, tasks=task_names, limit=limit, num_fewshot=num_fewshot,
                               task_manager=manager, log_samples=False)

    tasks: dict = {}
    scores: dict = {}
    seconds_by_length = {}
    if other_names:
        out = evaluate(other_names, task_manager)
        tasks.update(task_results(out))
        # one score per requested name (a group's aggregate, a generation task's own metric): the tables' columns
        needs = task_needs(other_names, task_manager)
        scores.update(requested_scores(out, other_names, {name: n.metric for name, n in needs.items()},
                                       metric_label(task_manager), {name: n.leaves for name, n in needs.items()}))
    ruler_names = list(next(iter(ruler_tasks.values()))[1]) if ruler_tasks else []
    runs: dict = {name: {} for name in ruler_names}
    for length, (manager, built) in sorted(ruler_tasks.items()):
        t0 = time.perf_counter()
        for name, metrics in task_results(evaluate(list(built.values()), manager)).items():
            runs[name][length] = (metrics, metrics["samples"])
        seconds_by_length[str(length)] = time.perf_counter() - t0
    tasks.update({name: ruler_metrics(by_length) for name, by_length in runs.items()})
    for name in ruler_names:  # a RULER task's score: its own metric, sample-weighted over the lengths
        scores[name] = {"metric": tasks[name]["metric"], "label": tasks[name]["metric"], "value": tasks[name]["score"],
                        "stderr": None, "kind": "task", "subtasks": 0}
    return tasks, scores, seconds_by_length
