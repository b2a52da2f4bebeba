"""The two kinds of KV cache the transfer path moves, behind the few operations it needs.

vLLM's cache is torch tensors (on the host or a GPU). The simulated engine's stand-in cache is numpy
arrays, so that its workers never import torch (~2 s and ~200 MiB per process, which is what scaling
tens of simulated workers on one machine is about). Both are indexed and sliced alike; what differs is
done here: the bytes on the host, a staging buffer, a copy into blocks. Torch is imported only where a
tensor is in hand, so it is already loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

CacheArray = Union["torch.Tensor", np.ndarray]  # one layer of a cache: [blocks, kv heads, *head block]


def dtype_name(array: CacheArray) -> str:
    """``bfloat16``, ``uint8``, …: the same name for a tensor and an array of one dtype."""
    return str(array.dtype).removeprefix("torch.")


def on_host(array: CacheArray) -> bool:
    return isinstance(array, np.ndarray) or array.device.type == "cpu"


def nbytes(array: CacheArray) -> int:
    return array.nbytes if isinstance(array, np.ndarray) else array.numel() * array.element_size()


def contiguous(array: CacheArray) -> bool:
    """Whether ``array``'s elements are one run of memory in order: only then can bytes land in it directly
    (vLLM's logical per-layer view is not, where its physical layout puts tokens before heads, as on GPUs)."""
    return array.flags.c_contiguous if isinstance(array, np.ndarray) else array.is_contiguous()


def host_bytes(array: CacheArray) -> np.ndarray:
    """The array's bytes as a flat uint8 numpy array: a view where it is contiguous on the host (writing to it
    writes the array), else a copy; from a GPU, a copy in pinned memory, which the bus fills several times
    faster than pageable memory (README, "bench transfer --device cuda"). PyTorch's caching host allocator keeps
    the pinned buffers for reuse: a GPU sender holds as much pinned memory as its largest concurrent layer runs
    took at once (rounded up to powers of two)."""
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    import torch

    if array.device.type == "cuda":
        host = torch.empty(array.shape, dtype=array.dtype, pin_memory=True)  # PyTorch's caching host allocator
        host.copy_(array)
        return host.view(-1).view(torch.uint8).numpy()
    return array.contiguous().cpu().view(-1).view(torch.uint8).numpy()


def staging(like: CacheArray, blocks: int, heads: int) -> CacheArray:
    """Host memory for ``blocks`` blocks of ``heads`` heads of ``like``'s layout (pinned, for a GPU cache)."""
    shape = (blocks, heads, *like.shape[2:])
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=like.dtype)
    import torch

    return torch.empty(shape, dtype=like.dtype, pin_memory=like.device.type == "cuda")


def copy_blocks(dest: CacheArray, dest_block_ids: Sequence[int], blocks: CacheArray, adjacent_from: int | None) -> None:
    """``dest[dest_block_ids] = blocks``; ``adjacent_from``: the ids are ``adjacent_from, +1, …`` (one strided
    copy, twice as fast as an indexed one on this CPU)."""
    if isinstance(dest, np.ndarray):
        if adjacent_from is not None:
            dest[adjacent_from : adjacent_from + len(dest_block_ids)] = blocks
        else:
            dest[list(dest_block_ids)] = blocks
        return
    import torch

    if adjacent_from is not None:
        dest[adjacent_from : adjacent_from + len(dest_block_ids)].copy_(blocks)
    else:
        ids = torch.tensor(list(dest_block_ids), dtype=torch.long, device=dest.device)
        dest.index_copy_(0, ids, blocks.to(dest.device))


def concatenate(parts: Sequence[CacheArray]) -> CacheArray:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(list(parts))
