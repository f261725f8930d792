"""Non-overlapping window multi-head self-attention: DaViT's spatial token mixer (as in Swin without shifts).

Semantics of ``window_attention(qkv, num_heads, window_size)``:
  * ``qkv`` is ``(B, H, W, 3 * C)``: the output of the block's ``qkv`` Linear on a channels-last map, channel
    order ``(3, num_heads, head_dim)`` (q, k, v; then heads), ``head_dim = C // num_heads``.
  * ``H`` and ``W`` must be multiples of ``window_size`` (``wh, ww``). Padding is the caller's job because padded
    tokens are NOT zeros of ``qkv``: DaViT zero-pads the normalised tokens *before* the Linear, so a padded token's
    q/k/v equal the Linear's bias and take part in the attention (no mask).
  * The map is cut into ``(H/wh) * (W/ww)`` windows of ``wh * ww`` tokens (row-major inside a window). In each
    window and head: ``out = softmax(q @ k^T * head_dim**-0.5, dim=-1) @ v``.
  * Returns ``(B, H, W, C)``, channel order ``(num_heads, head_dim)``, each token at its input position.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ops._dispatch import resolve_impl

__all__ = ["window_attention", "window_attention_reference"]


def window_attention_reference(qkv: torch.Tensor, num_heads: int,
                               window_size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """The definition (plain PyTorch, ``F.scaled_dot_product_attention`` per window and head)."""
    wh, ww = (window_size, window_size) if isinstance(window_size, int) else window_size
    B, H, W, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv has {C3} channels, not a multiple of 3 * num_heads = {3 * num_heads}")
    if H % wh or W % ww:
        raise ValueError(f"window_attention needs H, W divisible by the window {wh}x{ww}, got {H}x{W}: pad first")
    C = C3 // 3
    d = C // num_heads
    nh, nw = H // wh, W // ww
    # (B, nh, wh, nw, ww, 3, heads, d) -> (3, B * nh * nw, heads, wh * ww, d)
    x = qkv.reshape(B, nh, wh, nw, ww, 3, num_heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = x.reshape(3, B * nh * nw, num_heads, wh * ww, d).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # default scale = d ** -0.5
    out = out.reshape(B, nh, nw, num_heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, H, W, C)


def window_attention(qkv: torch.Tensor, num_heads: int, window_size: Union[int, Tuple[int, int]],
                     impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher the models call: Triton kernels on CUDA where available (see ``ops._dispatch``), else the reference."""
    resolve_impl(impl, qkv, supported=False)  # no Triton kernel yet: validates ``impl``; 'triton' raises clearly
    return window_attention_reference(qkv, num_heads, window_size)
