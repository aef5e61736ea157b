"""The rehearsal of the paper run (kvsharer.rehearsal, `make rehearsal`): config/paper.yaml with stand-in
models (kvsharer.models.standins) and stand-in tasks (kvsharer.evaluate.standin_tasks), through the local Slurm.

The unit tests check the substitutions against the real architectures and lm-eval's registry; the
slurm-marked test runs the `ci` cut of the rehearsal (one paper model, see kvsharer.rehearsal.CUTS)
through the repository's Slurm profile on the local one-node cluster (`.ci/start-slurm.sh`) and is
skipped when no Slurm answers.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from kvsharer import rehearsal
from kvsharer.evaluate.lm_tasks import task_needs
from kvsharer.evaluate.standin_tasks import kind_of, write_standins
from kvsharer.names import FIGURES, TABLES  # the DAG's tables and figures
from kvsharer.preflight import check_config
from kvsharer.models.shapes import ARCHITECTURES
from kvsharer.models.standins import HEAD_DIM, standin_model, standin_shape, standin_tokenizer, transformers_config

REPO = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
PAPER_SOURCES = sorted({m["source"] for m in PAPER["models"].values()})
# the kinds of the paper's benchmarks in lm-eval's registry (read once: the scan takes seconds)
KINDS = {"hellaswag": "multiple_choice", "piqa": "multiple_choice", "wsc273": "multiple_choice",
         "commonsense_qa": "multiple_choice", "boolq": "multiple_choice", "race": "multiple_choice",
         "mmlu": "group", "cmmlu": "group", "xsum": "generation", "longbench": "generation_group"}
HARNESS_KINDS = {n: KINDS[n] for n in PAPER["evaluation"]["harness"]["tasks"]}


@pytest.mark.parametrize("hub_id", PAPER_SOURCES)
def test_standin_has_the_models_architecture_at_cpu_width(hub_id):
    """Built (on the meta device) from the stand-in's transformers config: the real layer count, heads, KV
    heads, window, vocabulary, RoPE base and scaling, QKV biases; only the head width is HEAD_DIM."""
    from transformers import AutoModelForCausalLM

    from kvsharer.models.loading import find_parts

    real, config = ARCHITECTURES[hub_id], transformers_config(standin_shape("standin:" + hub_id))
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.vocab_size,
            config.max_position_embeddings) == (real.layers, real.heads, real.kv_heads, real.vocab, real.max_positions)
    assert config.head_dim == HEAD_DIM and config.hidden_size == real.heads * HEAD_DIM
    rope = config.rope_parameters
    rope = rope.get("full_attention", rope)  # per layer type (Gemma 3): the global layers' carry the model's base
    assert rope["rope_theta"] == real.rope_theta
    assert (rope["rope_type"] != "default") == (real.rope_scaling is not None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parts = find_parts(model)
    assert parts.n_layers == real.layers
    assert [(k.kind, k.window) for k in parts.kinds] == [(k.kind, k.window) for k in real.kinds()]
    if real.fused_qkv and not real.remote_code:  # Phi-4: transformers' own fused [q | k | v], shared by its adapter
        assert parts.fused is not None
        assert parts.attentions[0].qkv_proj.out_features == (real.heads + 2 * real.kv_heads) * HEAD_DIM
    else:
        assert (parts.attentions[0].k_proj.bias is not None) == real.qkv_bias
        assert parts.attentions[0].k_proj.out_features == real.kv_heads * HEAD_DIM
    if real.family in ("llama", "mistral", "qwen2"):
        assert type(model).__name__ == real.architecture


@pytest.mark.parametrize("hub_id", PAPER_SOURCES)
def test_full_width_standin_has_the_checkpoints_parameter_count(hub_id):
    """Heads 128 wide (benchmarks/gpu_rehearsal.sh): hidden and MLP sizes are the real ones, so the parameter
    count is the published checkpoint's (a multimodal one, Gemma 3, stores none: its vision tower is not described)."""
    if ARCHITECTURES[hub_id].params is None:
        pytest.skip(f"{hub_id}: no published text-only parameter count")
    assert standin_shape(f"standin:{hub_id}:128").param_count() == ARCHITECTURES[hub_id].params


def test_prepare_model_draws_a_standin_on_a_visible_gpu_and_converts_the_rest_on_the_cpu(monkeypatch, tmp_path):
    """A full-width stand-in's random weights take minutes on torch's serial CPU generator: prepare-model draws
    them on a GPU when one is visible to the job and it asks for one; a folder, hub or embedded model, and any
    job of --gpus 0, is converted on the CPU. The folder records where it was built."""
    from kvsharer.models import loading

    standin = "standin:mistralai/Mistral-7B-Instruct-v0.3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("KVSHARER_GPUS", raising=False)
    assert loading.draw_device(standin) == "cuda"
    assert loading.draw_device("embedded:smollm2-135m") == "cpu"
    assert loading.draw_device(str(tmp_path)) == "cpu"
    monkeypatch.setenv("KVSHARER_GPUS", "0")
    assert loading.draw_device(standin) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("KVSHARER_GPUS")
    assert loading.draw_device(standin) == "cpu"
    folder = loading.prepare_model(standin, tmp_path / "m")
    assert json.loads((folder / "kvsharer_source.json").read_text())["built_on"] == "cpu"
    model, _ = loading.load_model(str(folder))
    drawn, _ = standin_model(standin, torch.float32)  # the same seeded draw, not a fresh one
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, drawn.model.layers[3].mlp.up_proj.weight)


def test_standin_tokenizer_emits_ids_of_the_models_vocabulary():
    model, tokenizer = standin_model("standin:meta-llama/Llama-2-7b-chat-hf", torch.float32)
    text = "The passkey is 71432. Remember it. def f(x): return x ** 2  # ünïcode"
    ids = tokenizer(text).input_ids
    assert max(ids) < model.config.vocab_size and tokenizer.decode(ids) == text
    assert tokenizer is standin_tokenizer(len(tokenizer))  # trained once per process
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 32000)


def test_standin_tasks_have_the_structure_of_the_benchmarks(tmp_path):
    """make-tasks' stand-ins, read back by lm-eval: the group is a group with an aggregate of its four
    subtasks, the generation task reports rougeL, the multiple-choice task acc, so kind_of gives back the
    requested kinds (what the rehearsal's table columns are made of)."""
    from lm_eval.tasks import TaskManager

    from kvsharer.data import load_corpus

    wanted = {"mmlu": "group", "xsum": "generation", "hellaswag": "multiple_choice", "longbench": "generation_group"}
    manifest = write_standins(wanted, load_corpus("embedded:pydoc")[:200000], 0, 8, tmp_path)
    assert manifest["standin_mmlu"]["subtasks"] == [f"standin_mmlu_{i}" for i in range(4)]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    needs = task_needs([f"standin_{n}" for n in wanted], manager)
    assert {n: kind_of(needs[f"standin_{n}"]) for n in wanted} == wanted
    assert needs["standin_xsum"].metric == "rougeL" and len(needs["standin_mmlu"].leaves) == 4
    # LongBench's: generation subtasks over passages of hundreds of words, aggregated by their `score`
    assert needs["standin_longbench"].metric == "score" and len(needs["standin_longbench"].leaves) == 4
    for sub in manifest["standin_longbench"]["subtasks"]:
        items = [json.loads(line) for line in (tmp_path / f"{sub}.jsonl").read_text().splitlines()]
        assert len(items) == 8 and all(len(i["context"].split()) >= 300 for i in items)
        for item in items:  # the answer is the sentence after the quoted one, inside the passage
            quoted = item["context"].rsplit('follows "', 1)[1].rsplit('"?', 1)[0]
            assert " ".join([quoted, item["target"]]) in " ".join(item["context"].split())


def test_rehearsal_config_substitutes_models_tasks_and_text_only():
    """The `paper` cut: only the stated substitutions and CPU overrides differ from config/paper.yaml, and
    preflight passes on it (no config problem, no hub access asked for a stand-in)."""
    config = rehearsal.rehearsal_config(PAPER, "paper", kinds=KINDS)
    for name, model in config["models"].items():
        assert model["source"] == "standin:" + PAPER["models"][name]["source"]
        assert (model["dtype"], model["threads"], model["gpus"], model["batch_size"]) == ("float32", 1, 0, 1)
        assert 2000 < model["mem_mb"] <= 24000  # fits the local node
    harness = config["evaluation"]["harness"]
    assert harness["tasks"] == [f"standin_{t}" for t in PAPER["evaluation"]["harness"]["tasks"]]
    assert harness["standins"] == KINDS and harness["local_tasks"] is True
    assert config["evaluation"]["longbench"] == {**PAPER["evaluation"]["longbench"], "tasks": ["standin_longbench"]}
    assert config["evaluation"]["ruler"] == PAPER["evaluation"]["ruler"]  # RULER builds its data offline
    for key in ("search", "compose", "profile"):
        assert config[key] == PAPER[key]
    assert config["evaluation"]["longctx"] == PAPER["evaluation"]["longctx"]
    assert config["evaluation"]["ppl"] == PAPER["evaluation"]["ppl"]
    findings = check_config(config)
    assert findings.problems == []
    assert not [e for e in findings.environment if "standin:" in e]


def test_gpu_rehearsal_config_gives_model_jobs_threads_gpus_and_full_width():
    """benchmarks/gpu_rehearsal.sh's config: heads 128 wide in fp16, one GPU and several threads per model job
    (prepare-model draws the random weights on the CPU); a thread count below 1 is refused."""
    config = rehearsal.rehearsal_config(PAPER, "ci", gpus=1, kinds=KINDS, head_dim=128, dtype="float16",
                                        models=["llama2-7b-chat"], threads=4)
    (model,) = config["models"].values()
    assert (model["source"], model["dtype"], model["threads"], model["gpus"]) == (
        "standin:" + PAPER["models"]["llama2-7b-chat"]["source"] + ":128", "float16", 4, 1)
    with pytest.raises(ValueError, match="at least 1"):
        rehearsal.rehearsal_config(PAPER, "ci", kinds=KINDS, threads=0)


def test_task_kinds_are_read_from_lm_evals_registry():
    assert rehearsal.task_kinds(list(KINDS)) == KINDS


def test_cuts_name_only_paper_models_and_config_keys():
    for cut in rehearsal.CUTS:
        config = rehearsal.rehearsal_config(PAPER, cut, kinds=KINDS)
        assert set(config["models"]) <= set(PAPER["models"])
        assert check_config(config).problems == [], cut
    with pytest.raises(ValueError, match="unknown cut"):
        rehearsal.apply_cut(PAPER, "tiny")


# --- the ci cut through the local Slurm -------------------------------------------------------------


@pytest.mark.slurm
def test_rehearsal_ci_cut_runs_through_slurm(tmp_path, capsys):
    from test_slurm import _cluster_problem, _env, _failed, snakemake_slurm

    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)
    # CPU jobs (gpus 0): the cluster's one dummy GPU would run the model jobs one at a time
    config = rehearsal.rehearsal_config(PAPER, "ci", gpus=0, kinds=KINDS)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.monotonic()
    proc = snakemake_slurm(tmp_path, timeout=900)
    wall = time.monotonic() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise _failed(tmp_path, "the rehearsal (ci cut) through Slurm", proc.returncode, log)
    results = tmp_path / "results"
    for table in TABLES:  # every table and figure of the DAG, as for the paper config
        assert (results / "tables" / f"{table}.csv").exists() and (results / "tables" / f"{table}.md").exists(), table
    for figure in FIGURES:
        assert (results / "figures" / f"{figure}.png").exists() and (results / "figures" / f"{figure}.pdf").exists()
    assert (results / "tables" / "table1.csv").stat().st_size > 0
    rows = list(csv.DictReader((results / "tables" / "table1.csv").open()))
    assert {r["model"] for r in rows} == set(config["models"])  # one block of rows per rehearsed model
    harness = json.loads((results / "mistral-7b-instruct" / "eval" / "plain" / "harness.json").read_text())
    assert {n: s["kind"] for n, s in harness["scores"].items()} == {
        f"standin_{n}": "group" if k == "group" else "task" for n, k in HARNESS_KINDS.items()}
    assert harness["scores"]["standin_xsum"]["metric"] == "rougeL"
    longbench = json.loads((results / "mistral-7b-instruct" / "eval" / "plain" / "longbench.json").read_text())
    assert longbench["scores"]["standin_longbench"]["kind"] == "group"
    assert longbench["scores"]["standin_longbench"]["metric"] == "score"
    ruler = json.loads((results / "mistral-7b-instruct" / "eval" / "plain" / "ruler.json").read_text())
    assert set(ruler["tasks"]["niah_single_1"]["by_length"]) == {"256"}
    for figure in ("ppl_vs_rate", "passkey", "profile_memory"):
        assert (results / "figures" / f"{figure}.png").stat().st_size > 0, figure
    for stage in ("calibrate", "search", "evaluate_ppl", "evaluate_harness", "evaluate_longctx", "evaluate_ruler",
                  "evaluate_longbench", "profile"):
        assert f"rule_{stage}" in {p.name for p in (tmp_path / ".snakemake" / "slurm_logs").iterdir()}, stage
    report = subprocess.run(snakemake_report_cmd(tmp_path), capture_output=True, text=True, env=_env(),
                            cwd=tmp_path, timeout=180)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 0
    with capsys.disabled():
        print(f"\n[rehearsal ci cut] {len(config['models'])} models through Slurm in {wall:.0f} s, "
              f"report in {time.monotonic() - start - wall:.0f} s")


def snakemake_report_cmd(workdir: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--report", str(workdir / "report.html")]


def test_bad_standin_sources_and_models_are_refused_before_anything_loads():
    from kvsharer.models.sources import ModelError, check_source

    with pytest.raises(ModelError, match="no stand-in for 'org/unknown'"):
        check_source("standin:org/unknown")
    with pytest.raises(ModelError, match="head width must be even"):
        check_source("standin:meta-llama/Llama-2-7b-chat-hf:7")
    with pytest.raises(ValueError, match="lacks: gpt-5"):
        rehearsal.rehearsal_config(PAPER, "ci", kinds=KINDS, models=["gpt-5"])
    kept = rehearsal.rehearsal_config(PAPER, "ci", kinds=KINDS, models=["llama2-70b-chat"])
    assert list(kept["models"]) == ["llama2-70b-chat"] and kept["models"]["llama2-70b-chat"]["gpus"] == 0
