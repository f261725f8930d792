"""Blocked local self-attention with halos (HaloNet's token mixer).

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (Vaswani et al., arXiv:2103.12731).
Numerically the definition below is timm's ``HaloAttn`` (timm/layers/halo_attn.py), which HaloNet weights were
trained with; it is stated here independently of any module so a Triton kernel can be written against it.

Semantics of ``halo_attention(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride, scale)``:

* ``k``: ``(B, nh, dqk, H, W)``, ``v``: ``(B, nh, dv, H, W)`` (any strides, e.g. views into one fused kv conv
  output); ``H`` and ``W`` must be multiples of ``block_size``. The map is cut into non-overlapping
  ``block_size x block_size`` blocks, block ``(i, j)`` covering rows ``i*b .. i*b+b-1`` (``b = block_size``).
* ``q``: ``(B, nh, dqk, H/stride, W/stride)`` with ``block_size % stride == 0`` ("strided queries": the query
  conv ran with ``stride``): query block ``(i, j)`` is its ``bq x bq`` tile, ``bq = block_size // stride``.
* Every query in block ``(i, j)`` attends to the same ``win x win`` key/value window, ``win = b + 2*halo_size``:
  the block grown by ``halo_size`` on every side, i.e. rows ``i*b - halo .. i*b + b + halo - 1``. Positions outside
  the map are ZEROS (k = v = 0), not masked: they still take part in the softmax with logit ``0 + rel``.
* logits ``[qy, qx, ky, kx] = scale * <q, k> + <q, rel_pos_h[ky - qy + win - 1]> + <q, rel_pos_w[kx - qx + win - 1]>``
  with ``qy, qx`` in ``[0, bq)`` (query position inside its block, in query-map pixels) and ``ky, kx`` in
  ``[0, win)`` (key position inside the window). ``rel_pos_h``/``rel_pos_w`` are ``(2*win - 1, dqk)``; the relative
  logits are NOT multiplied by ``scale`` (default ``scale = dqk ** -0.5``).
* softmax over the ``win*win`` window positions, weighted sum of ``v``.
* Output ``(B, nh*dv, H/stride, W/stride)``, channel ``h*dv + c`` for head ``h`` (heads-major), contiguous NCHW.

Each batch element and head is independent. The ``torch.compile`` story is that of plain PyTorch ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import resolve_impl

__all__ = ["halo_attention", "halo_attention_reference"]


def _check_args(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride):
    if q.ndim != 5 or k.ndim != 5 or v.ndim != 5:
        raise ValueError(f"q, k, v must be (B, heads, dim, H, W), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, nh, dqk, H, W = k.shape
    if v.shape[:2] != (B, nh) or v.shape[-2:] != (H, W):
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)} in batch, heads or spatial size")
    if H % block_size or W % block_size:
        raise ValueError(f"halo attention needs the feature map ({H}x{W}) divisible by block_size={block_size}")
    if block_size % stride:
        raise ValueError(f"block_size={block_size} must be divisible by the query stride {stride}")
    if q.shape != (B, nh, dqk, H // stride, W // stride):
        raise ValueError(f"q must be {(B, nh, dqk, H // stride, W // stride)} for k {tuple(k.shape)} and "
                         f"stride {stride}, got {tuple(q.shape)}")
    win = block_size + 2 * halo_size
    for name, t in (("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
        if t.shape != (2 * win - 1, dqk):
            raise ValueError(f"{name} must be (2*win-1, dqk) = {(2 * win - 1, dqk)}, got {tuple(t.shape)}")


def halo_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                             block_size: int, halo_size: int, stride: int = 1,
                             scale: Optional[float] = None) -> torch.Tensor:
    """The definition (see the module docstring). Copies: the blocked q, the zero-padded k/v and their windows (the
    blocked matmuls need them), the logits and the output fold; nothing else."""
    _check_args(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride)
    B, nh, dqk, H, W = k.shape
    dv = v.shape[2]
    bq = block_size // stride
    win = block_size + 2 * halo_size
    nbh, nbw = H // block_size, W // block_size
    scale = dqk ** -0.5 if scale is None else scale

    # queries gathered into blocks once: (B, nh, nbh, nbw, bq, bq, dqk)
    qb = q.unflatten(3, (nbh, bq)).unflatten(5, (nbw, bq)).permute(0, 1, 3, 5, 4, 6, 2).contiguous()

    def windows(t: torch.Tensor) -> torch.Tensor:
        # (B, nh, d, H, W) -> zero halo -> overlapping windows (B, nh, nbh, nbw, win*win, d)
        t = F.pad(t, [halo_size] * 4).unfold(3, win, block_size).unfold(4, win, block_size)
        return t.permute(0, 1, 3, 4, 5, 6, 2).flatten(4, 5)

    kw, vw = windows(k), windows(v)

    # content logits (B, nh, nbh, nbw, bq*bq, win*win)
    attn = torch.matmul(qb.flatten(4, 5), kw.transpose(-1, -2)).mul_(scale)

    # relative logits: q against every relative offset (2*win - 1 of them), then for query row qy and key row ky
    # take offset ky - qy + win - 1 (columns likewise); the index is broadcast, not materialised
    rel = torch.arange(win, device=q.device)[None, :] - torch.arange(bq, device=q.device)[:, None] + win - 1
    logits_h = torch.matmul(qb, rel_pos_h.t())  # (..., qy, qx, 2*win - 1)
    logits_h = logits_h.gather(-1, rel[:, None, :].expand(*logits_h.shape[:-1], win))  # (..., qy, qx, ky)
    logits_w = torch.matmul(qb, rel_pos_w.t())
    logits_w = logits_w.gather(-1, rel[None, :, :].expand(*logits_w.shape[:-1], win))  # (..., qy, qx, kx)
    attn = attn.view(*attn.shape[:4], bq, bq, win, win)
    attn = attn.add_(logits_h.unsqueeze(-1)).add_(logits_w.unsqueeze(-2))
    attn = attn.flatten(-2).flatten(4, 5).softmax(dim=-1)

    out = torch.matmul(attn, vw)  # (B, nh, nbh, nbw, bq*bq, dv)
    # fold blocks back to NCHW: (B, nh, dv, nbh, bq, nbw, bq) -> (B, nh*dv, H/stride, W/stride)
    out = out.view(B, nh, nbh, nbw, bq, bq, dv).permute(0, 1, 6, 2, 4, 3, 5)
    return out.reshape(B, nh * dv, nbh * bq, nbw * bq)


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                   block_size: int, halo_size: int, stride: int = 1,
                   scale: Optional[float] = None, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: Triton kernels on CUDA where available (see ``ops._dispatch``), else the reference."""
    resolve_impl(impl, q, supported=False)  # no Triton kernel yet: validates ``impl``; 'triton' raises clearly
    return halo_attention_reference(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride, scale)
