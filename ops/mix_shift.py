"""Mix-shift: the token mixer of MS-MLP (Zheng et al., arXiv:2202.06510), as one op.

Semantics (``x`` is ``(B, C, H, W)``; ``shifts = (s_0, .., s_{G-1})``; ``weights``/``biases`` hold one sequence per
direction, direction 0 = "lr" (shift along W, dim 3), direction 1 = "td" (shift along H, dim 2)):

1. Channel groups exactly as ``torch.chunk(x, G, dim=1)``: every group has ``ceil(C / G)`` channels except the last,
   which gets the remainder (C=96, G=5: 20,20,20,20,16). ``torch.chunk`` can return fewer than ``G`` chunks (C=8,
   G=5 gives 2,2,2,2); that is an error here (see :func:`mix_shift_chunk_sizes`).
2. For group ``g`` (channels ``c`` of the group, local index ``c'``) and direction ``d`` the group is rolled
   circularly by ``s_g`` along that direction's axis (``torch.roll`` semantics, so ``y[.., w] = x[.., (w - s_g) mod W]``
   for "lr" and likewise over H for "td"), then convolved depthwise with ``weights[d][g]`` of shape
   ``(C_g, 1, kh, kw)`` (odd kh, kw; cross-correlation as ``F.conv2d``), zero padding ``(kh // 2, kw // 2)`` and
   bias ``biases[d][g]`` (``(C_g,)`` or None). The zero padding applies AFTER the roll: for "lr",
   ``out_d[b, c, h, w] = bias[c'] + sum_{i, j} W[c', 0, i, j] * x[b, c, h + i - kh//2, (w + j - kw//2 - s_g) mod W]``
   where terms with ``h + i - kh//2`` outside ``[0, H)`` or ``w + j - kw//2`` outside ``[0, W)`` are zero ("td" is the
   same with the roll on the H index instead).
3. The groups of each direction are concatenated back in channel order and the two directions summed:
   ``out = out_lr + out_td`` (same shape and dtype as ``x``).

In MS-MLP the kernel size grows with the shift distance (1, 3, 5, 7), so a fused kernel can fold each group's roll
into the depthwise conv's input indexing instead of materialising rolled copies. ``mix_shift_reference`` is the
definition (its depthwise convs are :func:`ops.dwconv.dwconv2d_reference`); ``mix_shift`` is the dispatcher models
call (no Triton kernel yet: always the reference).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ._dispatch import resolve_impl
from .dwconv import dwconv2d_reference

__all__ = ["mix_shift", "mix_shift_reference", "mix_shift_chunk_sizes"]

# (direction name, tensor dim that direction rolls): the order of ``weights`` / ``biases``.
_DIRECTIONS = (("lr", 3), ("td", 2))


def mix_shift_chunk_sizes(channels: int, groups: int) -> List[int]:
    """Channel count of each ``torch.chunk(x, groups, dim=1)`` group; raises if torch.chunk gives fewer groups."""
    size = math.ceil(channels / groups)
    n = math.ceil(channels / size)
    if n != groups:
        raise ValueError(
            f"mix-shift splits channels like torch.chunk: {channels} channels in chunks of {size} give {n} groups, "
            f"not {groups}; choose a channel count for which torch.chunk yields exactly {groups} chunks")
    return [size] * (n - 1) + [channels - size * (n - 1)]


def mix_shift_reference(x: torch.Tensor, weights: Sequence[Sequence[torch.Tensor]],
                        biases: Sequence[Sequence[Optional[torch.Tensor]]], shifts: Sequence[int]) -> torch.Tensor:
    """Mix-shift of ``x`` (B, C, H, W); see the module docstring for the exact definition."""
    groups = len(shifts)
    if len(weights) != len(_DIRECTIONS) or len(biases) != len(_DIRECTIONS):
        raise ValueError(f"weights and biases need one sequence per direction {[d for d, _ in _DIRECTIONS]}")
    if any(len(w) != groups for w in weights) or any(len(b) != groups for b in biases):
        raise ValueError(f"every direction needs {groups} kernels and biases (one per shift)")
    mix_shift_chunk_sizes(x.shape[1], groups)  # raises where torch.chunk would not give `groups` chunks
    xs = torch.chunk(x, groups, dim=1)
    out = None
    for (name, dim), ws, bs in zip(_DIRECTIONS, weights, biases):
        parts = []
        for xg, shift, w, b in zip(xs, shifts, ws, bs):
            kh, kw = w.shape[-2:]
            if kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"mix-shift kernels must have odd sizes, got {kh}x{kw} in direction {name!r}")
            parts.append(dwconv2d_reference(torch.roll(xg, shift, dim), w, b, padding=(kh // 2, kw // 2)))
        y = torch.cat(parts, dim=1)
        out = y if out is None else out + y
    return out


def mix_shift(x: torch.Tensor, weights: Sequence[Sequence[torch.Tensor]],
              biases: Sequence[Sequence[Optional[torch.Tensor]]], shifts: Sequence[int],
              impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: Triton kernels on CUDA where available (see ``ops._dispatch``), else the reference."""
    resolve_impl(impl, x, supported=False)  # no Triton kernel yet: validates ``impl``; 'triton' raises clearly
    return mix_shift_reference(x, weights, biases, shifts)
