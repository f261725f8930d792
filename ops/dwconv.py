"""Depthwise 2-D convolution: the large-kernel token mixer of FFNet, VAN, OverLoCK and MS-MLP.

``dwconv2d_reference`` is the definition (``F.conv2d`` with ``groups=C``). ``dwconv2d`` is the dispatcher the
models call; the Triton kernels (issue "Triton ops I") plug in behind it without changing any model.
``DWConv2d`` is an ``nn.Conv2d`` drop-in (same parameters and state_dict keys) whose forward goes through the
dispatcher.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._dispatch import resolve_impl

__all__ = ["dwconv2d", "dwconv2d_reference", "DWConv2d"]

_Pair = Union[int, Tuple[int, int]]


def dwconv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1) -> torch.Tensor:
    """Depthwise conv: ``weight`` is ``(C, 1, kh, kw)``, each channel convolved with its own kernel."""
    if weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"depthwise weight must be (C, 1, kh, kw) with C={x.shape[1]}, got {tuple(weight.shape)}")
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: Triton kernels on CUDA where available (see ``ops._dispatch``), else the reference."""
    resolve_impl(impl, x, supported=False)  # no Triton kernel yet: validates ``impl``; 'triton' raises clearly
    return dwconv2d_reference(x, weight, bias, stride, padding, dilation)


class DWConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, dim, k, groups=dim)`` whose forward calls :func:`dwconv2d` (keys ``weight``/``bias``)."""

    def __init__(self, dim: int, kernel_size: int, stride: int = 1, padding: Optional[int] = None,
                 dilation: int = 1, bias: bool = True, out_dim: Optional[int] = None):
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        out_dim = out_dim or dim
        super().__init__(dim, out_dim, kernel_size, stride, padding, dilation, groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_channels != self.in_channels:  # channel-multiplier depthwise: not the op's contract
            return super().forward(x)
        return dwconv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
