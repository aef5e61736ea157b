"""The registry of cache methods: one torch-free table that the CLI, compose, preflight, the report
and the rules read; a method added there is planned by the DAG from the config alone."""

from __future__ import annotations

import subprocess
import sys
from importlib import import_module

import pytest
import yaml
from test_dag import REPO, snakemake, tiny_config

from kvsharer import method_registry as registry


def test_the_registry_and_the_report_import_no_torch():
    code = ("import sys, kvsharer.method_registry, kvsharer.report.collect, kvsharer.cache.compose, kvsharer.preflight; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_reader_sees_the_same_names():
    from kvsharer import preflight
    from kvsharer.methods.intra import METHODS

    assert tuple(METHODS) == registry.names("intra") == preflight.TOKEN_METHOD_NAMES
    for name in registry.names("intra"):
        assert METHODS[name].name == name  # a class says its registry name
    for name, entry in registry.ENTRIES.items():
        assert entry.load() is not None and entry.summary
        assert entry.name in registry.known_names()
        # the registry's with_sharing is the torch-free copy of what the family's KVMethod class declares
        module, _, cls = registry.FAMILY_METHOD[entry.family].partition(":")
        assert getattr(import_module(module), cls).with_sharing is entry.with_sharing


@pytest.mark.parametrize("spec, family, with_sharing", [
    ("streamingllm:0.5", "intra", True), ("snapkv:256", "intra", True), ("h2o:0.5", "intra", True),
    ("int2", "quant", True), ("minicache:0.25", "minicache", False),
])
def test_a_spec_says_its_family_and_whether_it_composes_with_sharing(spec, family, with_sharing):
    parsed = registry.CacheSpec.parse(spec)
    assert (parsed.family, parsed.with_sharing) == (family, with_sharing)
    assert registry.spec_of_label(registry.label(spec)) == parsed.spec == spec
    assert registry.is_token_method(spec) == (family == "intra")


def test_the_dag_plans_a_new_method_from_the_config_alone(tmp_path, tiny_model_dir):
    """``compose.intra: [streamingllm:0.5, snapkv:0.5]`` plans their evaluations, plain and shared, with
    ``--cache <spec>`` on the command line."""
    config = tiny_config(tiny_model_dir)
    config["compose"]["intra"] = ["streamingllm:0.5", "snapkv:0.5"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n", "-p").stdout
    for spec in ("streamingllm:0.5", "snapkv:0.5"):
        lab = registry.label(spec)
        assert f"results/tiny/eval/plain+{lab}/ppl.json" in out
        assert f"results/tiny/eval/r0.5_dissimilar_euclidean_T0.5_s0+{lab}/ppl.json" in out
        assert f"results/tiny/eval/plain+{lab}/harness.json" in out
        assert f"--cache {spec}" in out
    assert REPO.is_dir()


def test_preflight_names_an_unknown_method_before_any_job():
    from kvsharer.preflight import check_cache_specs

    problems, good = check_cache_specs(["none", "h2o:0.5", "streamingllm:0.5", "h3o:0.5", "int4", "snapkv:2.5"],
                                       token_specs=["h2o:0.5", "int4"])
    assert good == ["none", "h2o:0.5", "streamingllm:0.5", "int4"]
    assert any("unknown method 'h3o'" in p for p in problems) and any("fraction kept" in p for p in problems)
    assert any("'int4' is not a token-level method" in p for p in problems)
