"""Routing of the flow-step kernels: the active (sample, field) pairs sorted by field, padded index lists.

The mixture-of-experts layout (:mod:`sta.kernels.flow_step`): the active pairs -- ``g[b, k] != 0``
-- are sorted by field and each field's list of sample indices is padded with -1 to a multiple of
``BLOCK_M``, so one program owns one block of ``BLOCK_M`` rows of one field. The index lists are
padded, never the data; a field with no active sample owns no block.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .configs import block_m_for

__all__ = ["Routing", "route"]


class Routing(NamedTuple):
    """Active (sample, field) pairs sorted by field, index lists padded to BLOCK_M.

    rows: (Npad,) int64 sample index of each padded row, -1 for padding;
    block_field: (num_blocks,) int32 field of each row block;
    block_ptr: (K + 1,) int32, field k owns blocks block_ptr[k] .. block_ptr[k+1]-1;
    block_m: rows per block; num_blocks; max_rows: most active rows of one field.
    """

    rows: torch.Tensor
    block_field: torch.Tensor
    block_ptr: torch.Tensor
    block_m: int
    num_blocks: int
    max_rows: int


def route(g: torch.Tensor, block_m: Optional[int] = None) -> Routing:
    """Sort the active pairs of ``g: (B, K)`` by field and pad each field's index list.

    Evaluates nothing for inactive pairs: a field with no active sample owns no block. One
    device-to-host copy (the K per-field counts, which size the launch grid).
    """
    K = g.shape[1]
    dev = g.device
    pair_field, pair_sample = torch.nonzero(g.t() != 0, as_tuple=True)  # sorted by field, then by sample
    counts_t = torch.bincount(pair_field, minlength=K)
    counts = counts_t.tolist()  # the one sync
    max_rows = max(counts, default=0)
    if block_m is None:
        active = sum(1 for n in counts if n)
        block_m = block_m_for(-(-sum(counts) // max(active, 1)))
    blocks = [-(-n // block_m) for n in counts]
    ptr = [0]
    for nb in blocks:
        ptr.append(ptr[-1] + nb)
    num_blocks = ptr[-1]
    block_ptr = torch.tensor(ptr, dtype=torch.int32).to(dev, non_blocking=True)
    block_field = torch.repeat_interleave(
        torch.arange(K, dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64)).to(dev, non_blocking=True)
    rows = torch.full((num_blocks * block_m,), -1, dtype=torch.int64, device=dev)
    if num_blocks:
        first = torch.cumsum(counts_t, 0) - counts_t  # index of each field's first pair in pair_field
        pos = torch.arange(pair_field.numel(), device=dev) - first[pair_field] + block_ptr[pair_field].long() * block_m
        rows[pos] = pair_sample
    return Routing(rows, block_field, block_ptr, block_m, num_blocks, max_rows)
