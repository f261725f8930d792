"""Channel-group ("transposed") multi-head attention: DaViT's channel token mixer.

Semantics of ``channel_attention(qkv, num_heads, version=1)``:
  * ``qkv`` is ``(B, N, 3 * C)``: the output of the block's ``qkv`` Linear on ``N`` tokens, channel order
    ``(3, num_heads, head_dim)``; per head ``q, k, v`` are ``(N, d)`` with ``d = C // num_heads``.
  * The attention map is ``d x d`` (channels attend to channels, every token contributes):
      - ``version=1`` (DaViT, ECCV'22): ``A = softmax(k^T @ v * d**-0.5, dim=-1)``; ``out = q @ A^T``.
        Note the roles: ``k`` and ``v`` form the map, which is applied to ``q``.
      - ``version=2`` (Florence-2's DaViT): ``A = softmax(q^T @ k * N**-0.5, dim=-1)``; ``out = v @ A^T``.
        The scale depends on the number of tokens ``N`` (not on ``d``).
  * Returns ``(B, N, C)``, channel order ``(num_heads, head_dim)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ops._dispatch import resolve_impl

__all__ = ["channel_attention", "channel_attention_reference"]


def channel_attention_reference(qkv: torch.Tensor, num_heads: int, version: int = 1) -> torch.Tensor:
    """The definition (plain PyTorch)."""
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv has {C3} channels, not a multiple of 3 * num_heads = {3 * num_heads}")
    C = C3 // 3
    d = C // num_heads
    q, k, v = qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
    if version == 1:
        a, b, c, scale = k, v, q, d ** -0.5
    elif version == 2:
        a, b, c, scale = q, k, v, N ** -0.5
    else:
        raise ValueError(f"channel attention version must be 1 or 2, got {version}")
    attn = ((a * scale).transpose(-2, -1) @ b).softmax(dim=-1)  # (B, heads, d, d)
    out = c @ attn.transpose(-2, -1)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(B, N, C)


def channel_attention(qkv: torch.Tensor, num_heads: int, version: int = 1, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher the models call: Triton kernels on CUDA where available (see ``ops._dispatch``), else the reference."""
    resolve_impl(impl, qkv, supported=False)  # no Triton kernel yet: validates ``impl``; 'triton' raises clearly
    return channel_attention_reference(qkv, num_heads, version)
