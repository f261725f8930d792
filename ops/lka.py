"""Large Kernel Attention (LKA): VAN's token mixer, as one op so a Triton kernel can fuse it later.

Exact semantics, for an input ``x`` of shape ``(B, C, H, W)``:

    a = depthwise_conv(x, w5, b5, kernel 5x5, stride 1, padding 2)                 # w5: (C, 1, 5, 5), b5: (C,)
    a = depthwise_conv(a, w7, b7, kernel 7x7, stride 1, dilation 3, padding 9)     # w7: (C, 1, 7, 7), b7: (C,)
    a = conv1x1(a, w1, b1)            (a dense channel mix, out[o] = sum_i w1[o, i] * a[i] + b1[o])  # w1: (C, C, 1, 1)
    out = x * a                       (elementwise gate by the input itself)

Both depthwise convs are zero-padded cross-correlations (``F.conv2d`` with ``groups=C``) that keep ``H x W``, so
every pixel's attention sees a 23x23 dilated neighbourhood of ``x`` (5x5 then 7x7 with dilation 3); biases may be
``None``. The output has the shape and dtype of ``x``. (Official ``LKA`` in Visual-Attention-Network/VAN-Classification,
``models/van.py``: ``conv0`` -> ``conv_spatial`` -> ``conv1``, then ``u * attn``.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import resolve_impl
from .dwconv import dwconv2d_reference

__all__ = ["lka", "lka_reference"]


def lka_reference(x: torch.Tensor, w5: torch.Tensor, b5: Optional[torch.Tensor], w7: torch.Tensor,
                  b7: Optional[torch.Tensor], w1: torch.Tensor, b1: Optional[torch.Tensor]) -> torch.Tensor:
    """LKA in plain PyTorch: the definition of the op (any device and dtype)."""
    c = x.shape[1]
    for name, w, shape in (("w5", w5, (c, 1, 5, 5)), ("w7", w7, (c, 1, 7, 7)), ("w1", w1, (c, c, 1, 1))):
        if tuple(w.shape) != shape:
            raise ValueError(f"lka: {name} must have shape {shape} for an input with C={c}, got {tuple(w.shape)}")
    attn = dwconv2d_reference(x, w5, b5, padding=2)
    attn = dwconv2d_reference(attn, w7, b7, padding=9, dilation=3)
    attn = F.conv2d(attn, w1, b1)
    return x * attn


def lka(x: torch.Tensor, w5: torch.Tensor, b5: Optional[torch.Tensor], w7: torch.Tensor, b7: Optional[torch.Tensor],
        w1: torch.Tensor, b1: Optional[torch.Tensor], impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher the models call: Triton on CUDA where available (see ``ops._dispatch``), else the reference."""
    resolve_impl(impl, x, supported=False)  # no Triton kernel yet: validates ``impl``; 'triton' raises clearly
    return lka_reference(x, w5, b5, w7, b7, w1, b1)
