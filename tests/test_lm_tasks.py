"""lm-eval task names as the paper's benchmarks: what each stands for (lm-eval's own index) and its one score."""

from __future__ import annotations

import pytest

from kvsharer.evaluate.scores import requested_scores


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def test_paper_tasks_as_lm_eval_defines_them(manager):
    from kvsharer.evaluate.lm_tasks import task_needs

    needs = task_needs(["mmlu", "cmmlu", "xsum", "hellaswag", "boolq", "no_such_task"], manager)
    assert "no_such_task" not in needs
    mmlu, cmmlu = needs["mmlu"], needs["cmmlu"]
    assert (mmlu.kind, mmlu.metric, len(mmlu.leaves)) == ("group", "acc", 57)
    assert mmlu.datasets == {"cais/mmlu"} and not mmlu.packages
    assert (cmmlu.kind, cmmlu.metric, len(cmmlu.leaves)) == ("group", "acc", 67)
    xsum = needs["xsum"]  # a unitxt task: its Python code needs the unitxt package
    assert xsum.kind == "task" and xsum.packages == {"unitxt"}
    assert needs["hellaswag"].metric == "acc" and needs["hellaswag"].datasets == {"Rowan/hellaswag"}
    assert needs["boolq"].datasets == {"aps/super_glue"}


def lm_eval_output() -> dict:
    """The shape of lm-eval 0.4.13's simple_evaluate output: every task and group in ``results``, the
    aggregating groups also in ``groups``, the tree in ``group_subtasks``."""
    subjects = {"mmlu_anatomy": 0.30, "mmlu_virology": 0.50, "mmlu_marketing": 0.70}
    results = {name: {"alias": name, "acc,none": acc, "acc_stderr,none": 0.05} for name, acc in subjects.items()}
    results["mmlu_stem"] = {"alias": "stem", "acc,none": 0.30, "acc_stderr,none": 0.05}
    results["mmlu_other"] = {"alias": "other", "acc,none": 0.60, "acc_stderr,none": 0.04}
    results["mmlu"] = {"alias": "mmlu", "acc,none": 0.46, "acc_stderr,none": 0.03}
    results["xsum"] = {"alias": "xsum", "rouge,none": 0.18, "rouge_stderr,none": 0.01}
    results["hellaswag"] = {"alias": "hellaswag", "acc,none": 0.41, "acc_stderr,none": 0.01, "acc_norm,none": 0.52,
                            "acc_norm_stderr,none": 0.01}
    return {"results": results,
            "groups": {g: results[g] for g in ("mmlu", "mmlu_stem", "mmlu_other")},
            "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": ["mmlu_anatomy"],
                               "mmlu_other": ["mmlu_virology", "mmlu_marketing"]}}


def test_one_score_per_requested_name():
    label = {("xsum", "rouge"): "rougeL"}
    scores = requested_scores(lm_eval_output(), ["hellaswag", "mmlu", "xsum"], {"mmlu": "acc"},
                              lambda task, metric: label.get((task, metric), metric))
    assert set(scores) == {"hellaswag", "mmlu", "xsum"}
    assert scores["mmlu"] == {"metric": "acc", "label": "acc", "value": 0.46, "stderr": 0.03, "kind": "group",
                              "subtasks": 3}
    assert (scores["hellaswag"]["metric"], scores["hellaswag"]["value"]) == ("acc", 0.41)  # acc, not acc_norm
    assert scores["xsum"]["metric"] == "rouge" and scores["xsum"]["label"] == "rougeL"
    assert scores["xsum"]["value"] == 0.18 and scores["xsum"]["stderr"] == 0.01


def test_a_subgroup_requested_on_its_own_is_a_group_too():
    scores = requested_scores(lm_eval_output(), ["mmlu_other"])
    assert scores == {"mmlu_other": {"metric": "acc", "label": "acc", "value": 0.60, "stderr": 0.04,
                                     "kind": "group", "subtasks": 2}}


def test_xsum_reads_its_dataset_and_nltk_data_from_unitxts_catalog(manager):
    pytest.importorskip("unitxt")
    from kvsharer.evaluate.lm_tasks import task_needs

    xsum = task_needs(["xsum"], manager)["xsum"]
    assert xsum.datasets == {"EdinburghNLP/xsum"}  # card xsum's loader
    assert xsum.nltk_data == {"tokenizers/punkt_tab"}  # its task's metric, rouge, sentence-splits with NLTK
