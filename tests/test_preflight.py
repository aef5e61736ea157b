"""Preflight on the paper config, offline: every problem the cluster run would hit, found before any job.

No hub here: the models' architectures come from kvsharer.models.shapes, the lm-eval tasks from lm-eval's own index,
and the Hugging Face cache is an empty folder. ``paper_before_fixes`` is config/paper.yaml as it was when
the main job had never run (its lengths, and the Slurm profile's old requests as overrides): preflight must
name each of its failures; on the current config and profile it must find no config problem.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from kvsharer import preflight as pf

REPO = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
PROFILE = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
LLAMA2 = ("llama2-7b-chat", "llama2-13b-chat")


@pytest.fixture(autouse=True)
def offline_empty_cache(monkeypatch, tmp_path):
    """No hub, an empty HF cache, no token: what preflight sees on a machine that never downloaded anything."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    from kvsharer.models import hub_access

    monkeypatch.setattr(hub_access, "hub_reachable", lambda *a, **k: pytest.fail("preflight probed the hub offline"))


def paper_before_fixes() -> tuple[dict, dict]:
    """(config, Slurm overrides) of the paper run before issue 13: passkey lengths and profile contexts up to
    Llama-2's whole window, no GPU for the profile, a GPU for prepare_model, search_scaling on the defaults."""
    config = copy.deepcopy(PAPER)
    config["evaluation"]["longctx"]["lengths"] = [1024, 2048, 4096]
    config["evaluation"]["longctx"].pop("answer_tokens", None)
    config["profile"]["contexts"] = [1024, 4096]
    config["scaling"].pop("threads", None)
    overrides = {"prepare_model": {"gpu": 1, "runtime": 60}, "profile": {"gpu": 0},
                 "search_scaling": {"mem_mb": 2000, "runtime": 30}}
    return config, overrides


def hide_packages(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def find(lines: list[str], *patterns: str) -> list[str]:
    return [line for line in lines if all(re.search(p, line) for p in patterns)]


def test_the_failures_of_the_paper_run_are_found_offline(monkeypatch):
    hide_packages(monkeypatch, "unitxt", "einops", "sentencepiece", "jieba")
    config, overrides = paper_before_fixes()
    found = pf.check_config(config, overrides)
    problems = found.problems
    for model in LLAMA2:  # 1: the passkey answer comes on top of a 4096-token prompt
        assert find(problems, f"'{model}'", r"passkey length 4096 \+ 8 answer tokens = 4104 exceeds its window of 4096")
        # 2: profile context + new tokens
        assert find(problems, f"'{model}'", r"profile context 4096 \+ 128 new tokens = 4224 exceeds its window of 4096")
    # models with longer windows are fine
    assert not find(problems, "'qwen2.5-7b-instruct'", "window")
    # 3: the 48 x 4096 fp32 random model of search_scaling in the default 2000 MB
    assert find(problems, "search_scaling", r"2000 MB", r"needs \d{5} MB")
    # 4: the profile (Table 2's memory and throughput) on CPU nodes, for every model
    assert len(find(problems, "rule profile", "no GPU", "CPU")) == len(config["models"])
    # 10: prepare_model holds a GPU it never uses
    assert len(find(problems, "prepare_model", "GPU", "CPU")) == len(config["models"])
    env = found.environment
    # 5: xsum is a unitxt task; 7: InternLM2's remote code imports einops and its tokenizer sentencepiece
    assert find(env, "xsum", "unitxt")
    assert find(env, "longbench", "jieba")  # LongBench's metrics import it (lm-eval does not install it)
    for model in ("internlm2-7b-chat", "internlm2-20b-chat"):
        assert find(env, model, "einops") and find(env, model, "sentencepiece")
    # 8: offline, the hub models are checked all the same, and what the jobs would lack is said
    assert find(env, "meta-llama/Llama-2-7b-chat-hf", "gated", "HF token")
    assert find(env, "Qwen/Qwen2.5-7B-Instruct", "not in the local HF cache", "HF_HUB_OFFLINE")
    assert find(env, "Salesforce/wikitext", "calibration")
    assert find(env, "cais/mmlu", "mmlu")
    # one message lists them all, config problems first, environment problems apart
    with pytest.raises(pf.PreflightError) as err:
        pf.preflight(config, overrides)
    message = str(err.value)
    assert message.index("passkey length") < message.index("environment of this host")
    assert all(p in message for p in problems + env)


def test_the_paper_config_and_profile_pass(monkeypatch):
    found = pf.check_config(PAPER, PROFILE["set-resources"])
    assert found.problems == []
    # what is left is this host's: nothing cached, no hub, no token, no NLTK data for xsum's ROUGE
    assert found.environment
    assert all(("HF_HUB_OFFLINE" in e or "HF token" in e or "NLTK" in e) for e in found.environment), found.environment
    found = pf.preflight(PAPER, PROFILE["set-resources"], environment="warn")  # a dry run: no error
    assert found.problems == []


def test_environment_problems_stop_a_real_run_but_not_a_dry_run():
    config = {"models": {"qwen": {"source": "Qwen/Qwen2.5-7B-Instruct", "dtype": "bfloat16", "mem_mb": 32000}},
              "calibration": {"text": "embedded:pydoc"}, "search": {"rates": [0.25]}, "evaluation": {}}
    with pytest.raises(pf.PreflightError, match="not in the local HF cache"):
        pf.preflight(config)
    assert pf.preflight(config, environment="warn").environment


def test_the_70b_model_needs_its_gpus_and_memory():
    config = copy.deepcopy(PAPER)
    config["models"] = {"llama2-70b-chat": dict(PAPER["models"]["llama2-70b-chat"])}
    assert pf.check_config(config, PROFILE["set-resources"]).problems == []
    config["models"]["llama2-70b-chat"].update(gpus=1, mem_mb=64000)
    problems = pf.check_config(config, PROFILE["set-resources"]).problems
    assert find(problems, "'llama2-70b-chat'", "mem_mb 64000", r"139954 MB needed", "69.0B parameters in float16")
    assert find(problems, "'llama2-70b-chat'", r"needs [2-9] GPUs of 80 GB", "gets 1")


def test_max_length_caps_a_model_and_must_leave_room_for_the_answer():
    config = copy.deepcopy(PAPER)
    config["models"] = {"qwen": dict(PAPER["models"]["qwen2.5-7b-instruct"]),
                        "llama": dict(PAPER["models"]["llama2-7b-chat"])}
    config["evaluation"]["longctx"]["lengths"] = [1024, 4088, 16384]
    problems = pf.check_config(config, PROFILE["set-resources"]).problems
    assert find(problems, "'llama'", "passkey length 16384") and not find(problems, "'qwen'", "passkey")
    config["models"]["llama"]["max_length"] = 4088  # the cap: this model runs 1024 and 4088 only
    assert not pf.check_config(config, PROFILE["set-resources"]).problems
    config["models"]["llama"]["max_length"] = 4096
    assert find(pf.check_config(config, PROFILE["set-resources"]).problems, "'llama'", "max_length 4096",
                r"\+ 8 answer tokens")


def test_long_context_benchmarks_run_up_to_each_models_window_one_prompt_at_a_time():
    """RULER runs each length up to the model's window (4k on Llama-2, 128k on Llama-3.1), LongBench truncates
    at min(31500, window); at 128k tokens only one prompt per batch fits an 80 GB GPU beside an 8B model, which
    preflight knows: the paper's batch_size 1 passes, the model's 16 does not."""
    from kvsharer import jobs

    assert jobs.ruler_lengths(PAPER, "llama2-7b-chat") == [4096]
    assert jobs.ruler_lengths(PAPER, "mistral-7b-instruct")[-1] == 32768
    assert jobs.ruler_lengths(PAPER, "llama3.1-8b-instruct")[-1] == 131072
    assert jobs.longbench_max_length(PAPER, "llama2-70b-chat") == 4096
    assert jobs.longbench_max_length(PAPER, "qwen2.5-7b-instruct") == 31500
    config = copy.deepcopy(PAPER)
    del config["evaluation"]["ruler"]["batch_size"], config["evaluation"]["longbench"]["batch_size"]
    problems = pf.check_config(config, PROFILE["set-resources"]).problems
    assert find(problems, "'llama3.1-8b-instruct'", "rule evaluate_ruler", r"16 x 131072 tokens")
    assert find(problems, "'llama3.1-8b-instruct'", "rule evaluate_longbench", r"16 x 31500 tokens")
    assert not find(problems, "'llama2-7b-chat'", "evaluate_ruler")


def test_a_ruler_length_too_short_for_the_prompt_with_the_models_tokenizer_is_refused():
    """The Qwen2.5 stand-in's rehearsal at 1,024 RULER tokens: with the tokenizer its jobs load (Qwen's
    pre-tokenizer over the stand-in's BPE) ruler_cwe's shortest prompt is ~1,180 tokens, so every sample would
    expect no answer and each RULER job would fail after its run. Preflight names it on the login node; at
    1,536 tokens it passes, and niah_single_1 (no floor) is never named."""
    config = copy.deepcopy(PAPER)
    config["models"] = {"qwen": {**PAPER["models"]["qwen2.5-7b-instruct"], "source": "standin:Qwen/Qwen2.5-7B-Instruct"}}
    config["evaluation"]["ruler"] = {**PAPER["evaluation"]["ruler"], "tasks": ["niah_single_1", "ruler_cwe"],
                                     "lengths": [512, 1024]}
    problems = find(pf.check_config(config, PROFILE["set-resources"]).problems, "'qwen'", "RULER")
    assert len(problems) == 1
    assert re.search(r"ruler_cwe at 512 tokens \(needs about 1\d\d\d .*ruler_cwe at 1024 tokens", problems[0])
    assert "niah_single_1" not in problems[0] and "evaluation.ruler.lengths" in problems[0]
    config["evaluation"]["ruler"]["lengths"] = [1536]
    assert not find(pf.check_config(config, PROFILE["set-resources"]).problems, "RULER")


def test_a_longbench_length_past_an_unknown_window_is_refused(monkeypatch):
    """A model whose window the DAG cannot know (a hub id outside the stored architectures) is checked by
    preflight from its config: a LongBench cap past it is a problem."""
    from kvsharer import jobs

    monkeypatch.setattr(jobs, "known_window", lambda source: None)
    config = copy.deepcopy(PAPER)
    config["models"] = {"llama": dict(PAPER["models"]["llama2-7b-chat"])}
    config["evaluation"]["ruler"]["lengths"] = [4096]
    problems = pf.check_config(config, PROFILE["set-resources"]).problems
    assert find(problems, "'llama'", "LongBench max_length 31500 exceeds its window of 4096")


def test_a_group_without_an_aggregate_is_refused():
    config = copy.deepcopy(PAPER)
    config["evaluation"]["harness"]["tasks"] = ["hellaswag", "mmlu_stem_tasks", "no_such_task"]
    problems = pf.check_config(config, PROFILE["set-resources"]).problems
    assert find(problems, "mmlu_stem_tasks", "no aggregate metric", "one score")
    assert find(problems, "unknown lm-eval task", "no_such_task")


def test_remote_code_and_task_packages_are_pinned():
    """Every package a paper model's remote code or a paper task needs is a dependency in pyproject.toml (a range
    with a tested lower bound) and pinned exactly in requirements/constraints.txt (what make setup installs) and
    envs/."""
    from kvsharer.evaluate.lm_tasks import FOLDER_PACKAGES
    from kvsharer.models.shapes import architecture_of

    needed = {p for m in PAPER["models"].values() for p in architecture_of(m["source"]).packages}
    needed |= {p for ps in FOLDER_PACKAGES.values() for p in ps}
    assert {"einops", "sentencepiece", "unitxt"} <= needed
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [*project["dependencies"], *[d for ds in project["optional-dependencies"].values() for d in ds]]
    env = yaml.safe_load((REPO / "envs" / "kvsharer.yaml").read_text())
    conda_pins = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    constraints = (REPO / "requirements" / "constraints.txt").read_text().splitlines()
    for package in needed:
        assert any(re.fullmatch(rf"{package}>=[\w.]+(,<[\w.]+)?", p) for p in pins), package
        assert any(re.fullmatch(rf"{package}==[\w.]+", p, re.IGNORECASE) for p in constraints), package
        assert any(re.fullmatch(rf"{package}==[\w.]+", p) for p in conda_pins), package


def test_preflight_of_table_models_imports_no_torch():
    import json
    import os
    import subprocess
    import sys

    config = {"models": {"qwen": {"source": "Qwen/Qwen2.5-7B-Instruct", "dtype": "bfloat16", "mem_mb": 32000}},
              "calibration": {"text": "embedded:pydoc"}, "search": {"rates": [0.25]},
              "evaluation": {"longctx": {"lengths": [1024]}, "ppl": {"window": 2048}}}
    code = ("import json, sys\nfrom kvsharer.preflight import check_config\n"
            f"found = check_config({config!r})\n"
            "print(json.dumps({'problems': found.problems, 'torch': 'torch' in sys.modules}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"problems": [], "torch": False}


def test_the_snakefile_checks_the_slurm_profiles_requests(tmp_path):
    """Through Snakemake: the profile's per-rule overrides reach preflight, which refuses them before any job."""
    import os
    import subprocess
    import sys

    from conftest import save_tiny_model
    from test_dag import tiny_config

    model = save_tiny_model(tmp_path / "tiny", n_layers=8)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(model)))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--profile", str(REPO / "slurm"), "-n", "--cores", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    bad = subprocess.run(cmd + ["--set-resources", "profile:gpu=0", "prepare_model:gpu=1", "search_scaling:mem_mb=100"],
                         capture_output=True, text=True, env=env, timeout=600)
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "config check failed before any job was submitted" in out
    assert "rule profile for model 'tiny' gets no GPU" in out
    assert "rule prepare_model for model 'tiny' asks for 1 GPU(s)" in out
    assert "rule search_scaling asks for 100 MB" in out


def test_the_token_methods_preflight_knows_are_kvsharer_intras():
    from kvsharer.methods.intra import METHODS

    assert set(pf.TOKEN_METHOD_NAMES) == set(METHODS)


def test_a_cached_hub_model_outside_the_table_is_checked_from_its_config(tmp_path):
    """A hub id the table does not know, with its config.json in the (here: fake) local HF cache: built on the
    meta device like a folder, its window and size checked."""
    from transformers import LlamaConfig

    from kvsharer.models import hub_access

    repo = hub_access.hub_cache() / "models--someorg--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=256).save_pretrained(snapshot)
    config = {"models": {"t": {"source": "someorg/tiny-llama"}}, "calibration": {"text": "embedded:pydoc"},
              "search": {"rates": [0.25, 0.9]}, "evaluation": {"longctx": {"lengths": [128, 256]}}}
    found = pf.check_config(config)
    assert find(found.problems, "sharing rate 0.9 is impossible for its 4 layers")
    assert find(found.problems, r"passkey length 256 \+ 8 answer tokens = 264 exceeds its window of 256")
    assert not find(found.environment, "someorg/tiny-llama")  # cached: nothing to fetch


def test_a_cpu_run_holds_the_kv_cache_in_host_memory():
    config = copy.deepcopy(PAPER)
    config["models"] = {"llama": {**PAPER["models"]["llama2-7b-chat"], "gpus": 0, "mem_mb": 20000}}
    problems = pf.check_config(config, PROFILE["set-resources"]).problems
    # the weights (13.5 GB) fit 20 GB, the passkey cells' K/V (10 x 4096 tokens x 512 KiB) do not
    assert not find(problems, "mem_mb 20000 is less")
    assert find(problems, "rule evaluate_longctx runs on CPU", "asks for 20000 MB")
    assert not find(problems, "rule profile")  # gpus: 0 is the config's own choice: the profile follows it


def test_layer_kinds_are_checked_from_a_folders_config_before_any_job(tmp_path):
    """A folder a researcher adds: multi-head latent attention is refused naming the family and why; a Gemma-3-like
    mix (5 sliding : 1 full) has only so many layers with an earlier layer of their own kind, so a rate needing
    more is refused; a rate within them passes."""
    from transformers import DeepseekV3Config, Gemma3TextConfig

    DeepseekV3Config(vocab_size=300, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                     q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                     num_experts_per_tok=2, max_position_embeddings=512).save_pretrained(tmp_path / "mla")
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 2
    Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, sliding_window=32, layer_types=layer_types,
                     max_position_embeddings=512).save_pretrained(tmp_path / "gemma")
    config = {"models": {"mla": {"source": str(tmp_path / "mla")}, "gemma": {"source": str(tmp_path / "gemma")}},
              "calibration": {"text": "embedded:pydoc"}, "search": {"rates": [0.5, 0.9]},
              "evaluation": {"longctx": {"lengths": [128]}}}
    found = pf.check_config(config)
    assert find(found.problems, r"model 'mla'.*multi-head latent attention")
    # 12 layers: 9 of the 10 sliding ones and 1 of the 2 full ones can share (10); rate 0.9 needs 11
    assert find(found.problems, r"model 'gemma': sharing rate 0.9 needs 11 sharing layers, but only 10 of its 12")
    assert not find(found.problems, r"model 'gemma': sharing rate 0.5")


def test_the_fitted_order_is_refused_for_a_family_its_maps_cannot_unrotate_unless_the_model_opts_out():
    config = copy.deepcopy(PAPER)
    assert "fitted" in config["search"]["orders"] and config["models"]["phi-4"]["kv_maps"] is False
    del config["models"]["phi-4"]["kv_maps"]
    problems = pf.check_config(config, PROFILE["set-resources"]).problems
    assert find(problems, "'phi-4'", "fitted order's K/V maps support the llama, mistral, qwen2, qwen3", "phi3",
                r"models\.phi-4\.kv_maps: false")
    assert len(find(problems, "K/V maps")) == 1  # the families they support pass
    config["search"]["orders"] = [o for o in config["search"]["orders"] if o != "fitted"]
    assert not find(pf.check_config(config, PROFILE["set-resources"]).problems, "K/V maps")
