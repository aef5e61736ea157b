"""What a model job needs, from the model's shape alone (torch-free): host memory, GPU memory, GPUs.

Preflight compares these with what the config and the Slurm profile request; the numbers are lower
bounds with a stated margin, not measurements:

* host memory to load: every stage loads the weights through host memory once (``prepare-model``
  converts them there, on CPU), so ``mem_mb`` must hold one copy of the weights in the config's dtype
  plus ``HOST_OVERHEAD_MB`` (interpreter, torch, tokenizer, CUDA context);
* GPU memory of a forward: weights + K/V of ``batch`` sequences of ``tokens`` tokens + activations
  (a few ``[tokens, hidden]`` tensors and the ``[tokens, vocab]`` logits per sequence, as
  ``kvsharer.measure.profile.max_batch`` counts them; generation keeps the last position's logits only), which
  must fit ``gpus`` GPUs filled to ``GPU_USABLE``.
"""

from __future__ import annotations

import math

from ..models.shapes import Shape

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GPU_MEMORY_GB = 80.0  # per GPU, when the config names none (profile.memory_gb): A100/H100 80 GB
GPU_USABLE = 0.9  # share of a GPU's memory a job can fill (CUDA context, allocator fragmentation)
HOST_OVERHEAD_MB = 2000


def host_mb_to_load(shape: Shape, dtype: str) -> int:
    """Host memory (MB) a job needs to load (or, in prepare-model, convert) the weights."""
    return math.ceil(shape.weight_bytes(DTYPE_BYTES[dtype]) / 1e6) + HOST_OVERHEAD_MB


def activation_bytes(shape: Shape, dtype: str, batch: int, tokens: int, all_logits: bool = True) -> int:
    """A few ``[tokens, hidden]`` tensors per sequence, and the logits of every position (scoring: perplexity,
    the search's reference) or of the last one only (``generate``)."""
    logits = shape.vocab * (tokens if all_logits else 1)
    return batch * (tokens * 8 * shape.hidden + logits) * DTYPE_BYTES[dtype]


def gpu_bytes(shape: Shape, dtype: str, batch: int, tokens: int, all_logits: bool = True) -> int:
    """Weights + K/V (no sharing: the plain model's, the largest) + activations of one forward."""
    size = DTYPE_BYTES[dtype]
    return (shape.weight_bytes(size) + shape.kv_bytes(batch, tokens, size)
            + activation_bytes(shape, dtype, batch, tokens, all_logits))


def gpus_needed(nbytes: float, gpu_memory_gb: float = GPU_MEMORY_GB) -> int:
    return max(1, math.ceil(nbytes / (gpu_memory_gb * 1e9 * GPU_USABLE)))


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"
