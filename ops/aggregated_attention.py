"""Aggregated attention: TransNeXt's pixel-focused token mixer (arXiv:2311.17132).

Every query pixel attends, in ONE softmax, to its ``K x K`` sliding-window neighbours (fine, local keys) and to
``P`` pooled tokens (coarse, global keys). Cosine similarity with a learnable per-head temperature, a learnable
query embedding and a length-dependent scale; no ``1/sqrt(d)`` factor. Learnable "tokens" add a query-dependent
term to the local weights AFTER the softmax.

Exact semantics (``aggregated_attention_reference`` is the definition; a Triton kernel must match it). Shapes:
batch ``B``, heads ``h``, head dim ``d``, query grid ``H x W`` with ``N = H*W`` tokens in row-major order,
``P`` pooled tokens, window ``K`` (odd), ``L = K*K``. For batch b, head h and query pixel ``n = (i, j)``::

    qn      = q / max(|q|, 1e-12)                                   (F.normalize over d)
    valid_z = neighbour z = (i + z // K - K // 2, j + z % K - K // 2) lies inside the H x W grid
    s_n     = log(#valid(n) + P), computed in float32, then cast to q's dtype
    qs      = (qn + query_embedding[h]) * softplus(temperature[h]) * s_n
    local   a_z = <qs, normalize(k)[nbr(n, z)]> + rpb_local[h, z]     if valid_z else -inf
    pooled  a_m = <qs, normalize(k_pool)[m]> + pool_bias[h, n, m]
    w       = softmax([a_1..a_L, a_1..a_P])                         (one softmax over L + P entries)
              (then dropout with probability ``attn_drop`` when it is > 0)
    out[n]  = sum_{valid z} (w_z + <qn, learnable_tokens[h, :, z]> + learnable_bias[h, 0, z]) * v[nbr(n, z)]
            + sum_m w_m * v_pool[m]

Note the learnable-token term uses ``qn`` (no query embedding, no scale). Neighbour order ``z = ki*K + kj``
(row-major, as ``F.unfold``). Out-of-grid neighbours contribute nothing (zero-padded values) and get ``-inf`` logits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import resolve_impl

__all__ = ["aggregated_attention", "aggregated_attention_reference", "window_valid_mask"]


def window_valid_mask(size: Tuple[int, int], window_size: int, device=None) -> torch.Tensor:
    """``(N, K*K)`` bool: True where neighbour ``z`` of query ``n`` lies inside the ``H x W`` grid."""
    ones = torch.ones(1, 1, *size, device=device)
    return F.unfold(ones, window_size, padding=window_size // 2)[0].transpose(0, 1) > 0


def _neighbours(x: torch.Tensor, size: Tuple[int, int], window_size: int) -> torch.Tensor:
    """``(B, h, N, d)`` tokens on an ``H x W`` grid -> ``(B, h, N, K*K, d)`` zero-padded window neighbours."""
    B, nh, N, d = x.shape
    x = x.transpose(-1, -2).reshape(B, nh * d, *size)
    x = F.unfold(x, window_size, padding=window_size // 2)  # (B, h*d*L, N), channel-major then window position
    return x.reshape(B, nh, d, window_size ** 2, N).permute(0, 1, 4, 3, 2)


def aggregated_attention_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        temperature: torch.Tensor,
        query_embedding: torch.Tensor,
        rpb_local: torch.Tensor,
        pool_bias: torch.Tensor,
        learnable_tokens: torch.Tensor,
        learnable_bias: torch.Tensor,
        size: Tuple[int, int],
        window_size: int = 3,
        attn_drop: float = 0.0,
) -> torch.Tensor:
    """Aggregated attention, plain PyTorch (the definition; see the module docstring).

    Args:
        q, k, v: ``(B, h, N, d)`` queries and local keys/values (raw projections, not normalised), ``N = H*W``.
        k_pool, v_pool: ``(B, h, P, d)`` pooled keys/values (raw projections).
        temperature: ``(h, 1, 1)``, passed through softplus.
        query_embedding: ``(h, 1, d)``.
        rpb_local: ``(h, K*K)`` bias of each window position.
        pool_bias: ``(h, N, P)`` bias of each (query, pooled token) pair.
        learnable_tokens: ``(h, d, K*K)``; learnable_bias: ``(h, 1, K*K)``.
        size: ``(H, W)`` of the query grid.
        window_size: ``K`` (odd).
        attn_drop: dropout probability on the softmax weights (pass 0 in eval).

    Returns:
        ``(B, h, N, d)``.
    """
    if window_size % 2 != 1:
        raise ValueError(f"window_size must be odd, got {window_size}")
    B, nh, N, d = q.shape
    if N != size[0] * size[1]:
        raise ValueError(f"q has {N} tokens but size {tuple(size)} has {size[0] * size[1]}")
    num_local, num_pool = window_size ** 2, k_pool.shape[-2]

    valid = window_valid_mask(size, window_size, q.device)  # (N, L)
    seq_length_scale = torch.log(valid.sum(-1, keepdim=True).float() + num_pool).to(q.dtype)  # (N, 1)
    q_norm = F.normalize(q, dim=-1)
    q_scaled = (q_norm + query_embedding) * F.softplus(temperature) * seq_length_scale

    k_local = _neighbours(F.normalize(k, dim=-1), size, window_size)  # (B, h, N, L, d)
    v_local = _neighbours(v, size, window_size)
    attn_local = (q_scaled.unsqueeze(-2) @ k_local.transpose(-1, -2)).squeeze(-2) + rpb_local.unsqueeze(1)
    attn_local = attn_local.masked_fill(~valid, float("-inf"))
    attn_pool = q_scaled @ F.normalize(k_pool, dim=-1).transpose(-1, -2) + pool_bias

    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    if attn_drop > 0:
        attn = F.dropout(attn, attn_drop)
    w_local, w_pool = attn.split([num_local, num_pool], dim=-1)
    w_local = w_local + q_norm @ learnable_tokens + learnable_bias  # (B, h, N, L)
    return (w_local.unsqueeze(-2) @ v_local).squeeze(-2) + w_pool @ v_pool


def aggregated_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        temperature: torch.Tensor,
        query_embedding: torch.Tensor,
        rpb_local: torch.Tensor,
        pool_bias: torch.Tensor,
        learnable_tokens: torch.Tensor,
        learnable_bias: torch.Tensor,
        size: Tuple[int, int],
        window_size: int = 3,
        attn_drop: float = 0.0,
        impl: Optional[str] = None,
) -> torch.Tensor:
    """Dispatcher the models call: Triton kernels on CUDA where available (``ops._dispatch``), else the reference."""
    resolve_impl(impl, q, supported=False)  # no Triton kernel yet: validates ``impl``; 'triton' raises clearly
    return aggregated_attention_reference(
        q, k, v, k_pool, v_pool, temperature, query_embedding, rpb_local, pool_bias,
        learnable_tokens, learnable_bias, size, window_size, attn_drop)
