"""Profile stage: measured KV bytes equal the model-shape prediction, with and without H2O, at every rate;
the peak memory is measured, not computed."""

from __future__ import annotations

import csv

import pytest
import torch

from kvsharer.cli import main as cli
from kvsharer.models.loading import load_model
from kvsharer.cache.policy import SharingPolicy
from kvsharer.measure.profile import COLUMNS, parse_methods, run_once


def test_profile_rows_match_the_model_shape(tiny_model_dir, tmp_path):
    out = tmp_path / "profile.csv"
    assert cli(["profile", "--model", str(tiny_model_dir), "--rates", "0,0.25,0.5", "--cache", "none,h2o:0.5",
                "--batch-sizes", "1,2", "--contexts", "32", "--new-tokens", "4", "--memory-gb", "0.01",
                "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    grid = [r for r in rows if r["kind"] == "grid"]
    assert len(grid) == 3 * 2 * 2
    for row in grid:
        assert int(row["kv_bytes"]) == int(row["expected_kv_bytes"])  # exact, also after H2O eviction
        assert float(row["decode_tok_s"]) > 0 and float(row["prefill_s"]) > 0
        assert row["peak_method"] == "rss_hwm"  # Linux, CPU: the process' resident set at its peak
        assert int(row["peak_bytes"]) >= int(row["weights_bytes"])  # weights + what the run added
    plain = {(r["intra"], r["batch"]): int(r["kv_bytes"]) for r in grid if float(r["rate"]) == 0}
    half = {(r["intra"], r["batch"]): int(r["kv_bytes"]) for r in grid if float(r["rate"]) == 0.5}
    assert all(half[k] * 2 == plain[k] for k in plain)  # 4 of 8 layers share: exactly half the bytes
    assert plain[("h2o", "2")] * 2 == plain[("none", "2")]  # H2O at 50 % of 36 seen tokens keeps 18
    max_rows = [r for r in rows if r["kind"] == "max_batch"]
    assert len(max_rows) == 3 * 2
    batches = {(float(r["rate"]), r["intra"]): int(r["batch"]) for r in max_rows}
    assert batches[(0.5, "none")] >= batches[(0.0, "none")]  # less KV per sequence: at least as many fit


@pytest.mark.parametrize("text, message", [
    ("h2o", "expected none"),
    ("magic:0.5", "unknown method"),
    ("h2o:1.5", "fraction kept"),
    (",", "names nothing"),
])
def test_bad_cache_methods(text, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(text)


def test_peak_memory_is_measured_not_computed_from_shapes(tiny_model_dir):
    """A 256 MiB tensor held during every forward (allocated by a pre-hook, freed by a post-hook) raises
    the CPU peak by 256 MiB: no formula over weights, K/V or activation shapes contains it."""
    model, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    policy = SharingPolicy.identity(8)
    run_once(model, policy, None, 1, 32, 2)  # warm-up
    plain = run_once(model, policy, None, 1, 32, 2)
    extra = 256 * 2**20
    held = {}
    layer = model.model.layers[3]
    hooks = [layer.register_forward_pre_hook(lambda module, args: held.update(t=torch.ones(extra // 4))),  # written: resident
             layer.register_forward_hook(lambda module, args, out: held.clear())]  # None: output unchanged
    try:
        hooked = run_once(model, policy, None, 1, 32, 2)
    finally:
        for hook in hooks:
            hook.remove()
    assert not held and plain["peak_method"] == hooked["peak_method"] == "rss_hwm"
    assert hooked["kv_bytes"] == plain["kv_bytes"]
    assert hooked["peak_bytes"] - plain["peak_bytes"] == pytest.approx(extra, rel=0.05)
    assert COLUMNS[-1] == "peak_method"


def test_a_model_spread_over_gpus_is_profiled_on_all_of_them(monkeypatch):
    """A model loaded with --gpus 2: its peak memory is the sum over both GPUs (cuda:0 alone would hide the
    other half of a 70B model)."""
    import torch

    from conftest import make_tiny
    from kvsharer.measure.peakmem import PeakMemory
    from kvsharer.measure.profile import gpus_of

    model = make_tiny("llama", n_layers=4)
    assert gpus_of(model) == []  # on CPU: no GPU to read
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
                           "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    gpus = gpus_of(model)
    assert gpus == [torch.device("cuda", 0), torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: {0: 1_000, 1: 2_000}[d.index])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: {0: 7_000, 1: 5_000}[d.index])
    with PeakMemory(gpus[0], gpus) as peak:
        pass
    assert (peak.method, peak.peak, peak.baseline, peak.extra) == ("cuda_allocator", 12_000, 3_000, 9_000)
