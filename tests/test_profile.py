"""Profile stage: measured KV bytes equal the model-shape prediction, with and without H2O, at every rate."""

from __future__ import annotations

import csv

import pytest

from kvsharer.cli import main as cli
from kvsharer.profile import parse_methods


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
        assert int(row["peak_bytes"]) == int(row["weights_bytes"]) + int(row["kv_bytes"])  # CPU: tensor bytes
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


def test_a_model_spread_over_gpus_is_profiled_on_all_of_them(monkeypatch):
    """A model loaded with --gpus 2: its peak memory is the sum over both GPUs (cuda:0 alone would hide the
    other half of a 70B model)."""
    import torch

    from conftest import make_tiny
    from kvsharer.profile import gpus_of, peak_gpu_bytes

    model = make_tiny("llama", n_layers=4)
    assert gpus_of(model) == []  # on CPU: no GPU to read
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
                           "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    gpus = gpus_of(model)
    assert gpus == [torch.device("cuda", 0), torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: {0: 7_000, 1: 5_000}[d.index])
    assert peak_gpu_bytes(gpus) == 12_000
