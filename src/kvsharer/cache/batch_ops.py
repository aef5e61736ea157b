"""The batch operations ``generate`` asks of a cache layer (beam search, ``num_return_sequences``, ...), for a layer
class that holds more per-sequence tensors than ``DynamicLayer``'s keys and values (token methods' positions and
scores, quantized codes): each is one index operation along the batch axis applied to every such tensor, which the
layer's ``_map_batch(fn)`` does."""

from __future__ import annotations

from typing import Callable

import torch


class BatchOps:
    """Mixed in before ``DynamicLayer``: ``reorder_cache``, ``batch_repeat_interleave`` and ``batch_select_indices``
    through the layer's ``_map_batch``."""

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError  # the layer applies fn to every per-sequence tensor it holds

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])
