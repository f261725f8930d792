"""2-D neighborhood attention ops with NATTEN 0.17 semantics (the unfused ``na2d_qk`` / ``na2d_av``).

OverLoCK's ContMix aggregates values over a k x k neighbourhood with per-pixel weights through NATTEN's
``na2d_av``; NATTEN >= 0.20 no longer ships it, so it is defined here in plain PyTorch.

Layout (NATTEN <= 0.17 unfused ops): query / key / value ``[B, heads, H, W, D]``, attention ``[B, heads, H, W, k*k]``
with tap ``a*k + c`` = row offset ``a``, column offset ``c``; output like ``value``. Non-causal, odd square kernel.

Window rule (NATTEN ``get_window_start``, non-causal), per axis of length ``L``, kernel ``k``, ``nb = k // 2``,
dilation ``d``: pixel ``i`` belongs to dilation group ``g = i % d`` at index ``ip = i // d`` of a group holding
``Lp = len(range(g, L, d))`` pixels, and its neighbours along the axis are ``s(i) + a*d`` for ``a < k`` with::

    s(i) = clamp(ip - nb, 0, Lp - k) * d + g

i.e. the window is centred where possible and SHIFTED to stay inside the image (inside its dilation group) at the
borders; it is never zero-padded and always has exactly ``k`` taps. This needs ``k * d <= L`` (as in NATTEN).

    na2d_qk: attn[b,h,i,j,a*k+c] = sum_D query[b,h,i,j,:] * key[b,h, s(i)+a*d, s(j)+c*d, :]  (+ rpb bias)
    na2d_av: out[b,h,i,j,:]      = sum_{a,c} attn[b,h,i,j,a*k+c] * value[b,h, s(i)+a*d, s(j)+c*d, :]

Relative-position bias (NATTEN ``get_pb_start``): ``rpb`` is ``[heads, 2k-1, 2k-1]``; tap ``(a, c)`` of pixel
``(i, j)`` reads ``rpb[h, p(i)+a, p(j)+c]`` where ``p(i) = (k-1) - (i - s(i)) // d``, i.e. the bias depends only on
the offset (in dilated steps) between neighbour and pixel. For ``d = 1`` this is ``k-1-i`` near the start,
``L-1-i`` near the end and ``k//2`` in the interior. :func:`na2d_rpb` returns the bias as ``[heads, H, W, k*k]``
(OverLoCK adds it to its own dynamic-kernel logits, ``na2d_qk(..., rpb=)`` adds it to q.k).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import resolve_impl

__all__ = ["na2d_qk", "na2d_qk_reference", "na2d_av", "na2d_av_reference", "na2d_rpb", "window_start"]


def window_start(length: int, kernel_size: int, dilation: int = 1, device=None) -> torch.Tensor:
    """``s(i)`` for ``i < length`` (int64 ``[length]``): the first neighbour of each pixel along one axis."""
    if kernel_size % 2 != 1:
        raise ValueError(f"neighborhood attention needs an odd kernel_size, got {kernel_size}")
    if kernel_size * dilation > length:
        raise ValueError(f"neighborhood attention needs kernel_size * dilation <= the feature-map size; got "
                         f"kernel_size={kernel_size}, dilation={dilation} for an axis of length {length}")
    i = torch.arange(length, device=device)
    group, ip = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation  # len(range(g, length, dilation))
    start = torch.minimum((ip - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    return start * dilation + group


def _neighbours(length: int, kernel_size: int, dilation: int, device) -> torch.Tensor:
    """Neighbour indices ``[L, k]`` of every pixel along one axis."""
    start = window_start(length, kernel_size, dilation, device)
    return start[:, None] + dilation * torch.arange(kernel_size, device=device)


def na2d_rpb(rpb: torch.Tensor, height: int, width: int, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """Relative-position bias ``rpb [heads, 2k-1, 2k-1]`` laid out like the attention: ``[heads, H, W, k*k]``."""
    k = kernel_size
    if rpb.shape[-2:] != (2 * k - 1, 2 * k - 1):
        raise ValueError(f"rpb must be [heads, {2 * k - 1}, {2 * k - 1}] for kernel_size={k}, got {tuple(rpb.shape)}")
    taps = torch.arange(k, device=rpb.device)
    rows = []
    for length in (height, width):
        start = window_start(length, k, dilation, rpb.device)
        pos = torch.arange(length, device=rpb.device)
        rows.append((k - 1) - (pos - start) // dilation)  # p(i)
    row = (rows[0][:, None] + taps)[:, None, :, None]  # [H, 1, k, 1]
    col = (rows[1][:, None] + taps)[None, :, None, :]  # [1, W, 1, k]
    return rpb[:, row, col].reshape(rpb.shape[0], height, width, k * k)


def _check(x: torch.Tensor, attn_or_key: torch.Tensor, name: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} expects [B, heads, H, W, D] tensors, got shape {tuple(x.shape)}")
    if attn_or_key.shape[:4] != x.shape[:4]:
        raise ValueError(f"{name}: leading dims [B, heads, H, W] differ: {tuple(attn_or_key.shape)} vs {tuple(x.shape)}")


def na2d_qk_reference(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int = 1,
                      rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Neighbourhood logits ``[B, heads, H, W, k*k]`` (no scaling applied), optionally plus the RPB bias."""
    _check(query, key, "na2d_qk")
    H, W, k = query.shape[2], query.shape[3], kernel_size
    rows = _neighbours(H, k, dilation, query.device)
    cols = _neighbours(W, k, dilation, query.device)
    taps = []
    for a in range(k):  # one row offset at a time keeps memory at k x the input
        key_a = key[:, :, rows[:, a]][:, :, :, cols]  # [B, heads, H, W, k, D]
        taps.append(torch.einsum("bhijd,bhijcd->bhijc", query, key_a))
    attn = torch.stack(taps, dim=-2).flatten(-2)
    if rpb is not None:
        attn = attn + na2d_rpb(rpb, H, W, k, dilation).to(attn.dtype)
    return attn


def na2d_av_reference(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """Weighted sum of each pixel's k x k neighbours: ``[B, heads, H, W, D]``."""
    _check(value, attn, "na2d_av")
    H, W, k = value.shape[2], value.shape[3], kernel_size
    if attn.shape[-1] != k * k:
        raise ValueError(f"na2d_av: attn has {attn.shape[-1]} taps, expected kernel_size**2 = {k * k}")
    rows = _neighbours(H, k, dilation, value.device)
    cols = _neighbours(W, k, dilation, value.device)
    attn = attn.unflatten(-1, (k, k))
    out = 0
    for a in range(k):
        value_a = value[:, :, rows[:, a]][:, :, :, cols]  # [B, heads, H, W, k, D]
        out = out + torch.einsum("bhijc,bhijcd->bhijd", attn[..., a, :], value_a)
    return out


def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int = 1,
            rpb: Optional[torch.Tensor] = None, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher for :func:`na2d_qk_reference` (no Triton kernel yet)."""
    resolve_impl(impl, query, supported=False)
    return na2d_qk_reference(query, key, kernel_size, dilation, rpb)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int = 1,
            impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher for :func:`na2d_av_reference` (no Triton kernel yet)."""
    resolve_impl(impl, value, supported=False)
    return na2d_av_reference(attn, value, kernel_size, dilation)
