"""Models bigger than one GPU, on CPU: the device map a 2-GPU job builds, what load_model asks transformers
for, and a shared layer whose source sits on another device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny, save_tiny_model

from kvsharer.models import loading as models
from kvsharer.models.loading import ModelError, placement


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture
def two_gpus(monkeypatch):
    """A job that sees two GPUs of ``memory[0]`` bytes each (set by the test)."""
    memory = [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=memory[0]))
    return memory


def test_a_model_bigger_than_one_gpu_is_spread_over_two(two_gpus):
    from accelerate import infer_auto_device_map

    model = make_tiny("llama", n_layers=8, vocab_size=4096)  # embeddings and head dominate: 2 x 4096 x 64
    two_gpus[0] = int(model_bytes(model) * 0.9)  # one GPU holds 0.9 x 0.9 of the model: not all of it
    kwargs = placement("cuda", 2)
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"] == {0: int(two_gpus[0] * models.GPU_FILL), 1: int(two_gpus[0] * models.GPU_FILL)}
    device_map = infer_auto_device_map(model, max_memory=kwargs["max_memory"],
                                       no_split_module_classes=model._no_split_modules)
    assert set(device_map.values()) == {0, 1}  # both GPUs, nothing offloaded to CPU or disk
    layers = [device_map.get(f"model.layers.{i}", device_map.get("model")) for i in range(8)]
    assert layers == sorted(layers)  # in order: the first layers on GPU 0, the last on GPU 1
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 1


def test_a_request_the_job_cannot_meet_is_refused(two_gpus):
    two_gpus[0] = 10**9
    assert placement("cuda", 1) == {}  # one GPU: loaded on CPU and moved there, as before
    with pytest.raises(ModelError, match="4 GPUs were requested .* but 2 are visible"):
        placement("cuda", 4)
    with pytest.raises(ModelError, match="no GPU is visible"):
        placement("cpu", 2)


def test_load_model_asks_transformers_for_the_device_map(tmp_path, two_gpus, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "tiny")
    two_gpus[0] = 8 * 10**9
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(source, **kwargs):
        seen.update(kwargs)
        return real(source, **{k: v for k, v in kwargs.items() if k not in ("device_map", "max_memory")})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: pytest.fail("a spread model was moved"))
    monkeypatch.setenv("KVSHARER_GPUS", "2")  # what `python -m kvsharer --gpus 2 <stage>` sets
    model, _ = models.load_model(str(folder), device="cuda")
    assert seen["device_map"] == "auto" and seen["max_memory"] == {0: 7.2e9, 1: 7.2e9}
    seen.clear()
    monkeypatch.undo()  # one GPU (the default): no device map
    model, _ = models.load_model(str(folder), device="cpu")
    assert "device_map" not in seen


def test_cli_gpus_reaches_load_model(monkeypatch):
    from kvsharer.cli import main

    monkeypatch.setenv("KVSHARER_GPUS", "1")  # restored (to unset) after the test, whatever the CLI sets
    monkeypatch.setattr("kvsharer.cli.importlib.import_module",
                        lambda name: SimpleNamespace(main=lambda args: 0, add_arguments=lambda p: None))
    assert main(["--gpus", "4", "tables"]) == 0
    assert models.requested_gpus() == 4


def test_a_shared_layer_reads_its_source_on_its_own_device():
    """Layer i on GPU 1 reads layer j's K/V held on GPU 0: the shared layer hands them over on i's device
    (here: source on CPU, the reading layer's states on the meta device)."""
    from transformers.cache_utils import DynamicLayer

    from kvsharer.cache.sharing import SharedLayer

    source = DynamicLayer()
    shared = SharedLayer(source, 0)  # connected first: it reads what the source's update returns in this forward
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    source.update(k, v)
    keys, values = shared.update(torch.empty(1, 2, 1, 4, device="meta"), torch.empty(1, 2, 1, 4, device="meta"))
    assert keys.device.type == values.device.type == "meta" and keys.shape == k.shape
    same, _ = shared.update(torch.empty(1, 2, 1, 4), torch.empty(1, 2, 1, 4))
    assert same is source.keys  # on one device: the source's own tensors, no copy
