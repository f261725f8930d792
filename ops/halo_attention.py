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

Each batch element and head is independent.

Triton path (``impl='triton'``, and ``auto`` on CUDA tensors; measured in
``benchmarks/bench_halo.py``): fp32/fp16/bf16 (fp32 accumulation, fp32 ``tl.dot`` in IEEE precision; under autocast
all operands are cast to the autocast dtype, as the reference's matmuls would be), any input strides (the model's
k/v are views into one conv output, channels-last under AMP), any head dims (padded to powers of two; q/k head
<= 128, <= 32 in fp32), strided queries, blocks up to 8 x 8 and windows up to 16 x 16
(``block_size + 2*halo_size <= 16``: every HaloNet here but H5). Other arguments: the reference (``auto``), or an error (``impl='triton'``).

* One program per (batch*head, block, chunk of the block's queries; by default as many queries as keep the logits
  tile at 16K values, 4K in the backward for head dims > 32, half that in fp32: e.g. 64 = H1's whole 8 x 8
  block): the queries against the whole window, read straight from ``k``/``v`` with masked loads
  (``other=0``: the zero halo takes part in the softmax, as above), laid out as a ``WP x WP`` tile
  (``WP = next_pow2(win)``; rows/columns ``>= win`` are the only masked-out positions).
* Relative logits: ``q @ rel_pos_h^T`` once per program (``queries x (2*win-1)``), ``tl.gather`` by
  ``ky - qy + win - 1`` into one logit per (query, window row), spread over the window's positions by a matmul with
  a one-hot (row -> position) matrix (columns likewise). The dq kernel broadcasts them through a
  ``(queries, WP, WP)`` view instead (windows of 8+), and sums the logits' gradient per row (column) over that view,
  then gathers it back to the offsets; with the one-hot matmuls there it spilled registers (H1, sm_90).
* Forward: one softmax over the window, times ``v`` 64 value channels at a time; stores the output and the row
  logsumexp. Backward, two kernels, no atomics (deterministic): query-stationary (the forward's programs)
  recomputes logits and probabilities, writes ``dq``, ``delta = rowsum(dO * O)`` and the relative tables' gradient
  per program (summed afterwards); key-stationary, one program per key block (and chunk of value channels), visits
  the query blocks whose windows cover its keys (3 x 3 of them while ``halo_size <= block_size``), recomputes their
  probabilities from the saved logsumexp and ``delta`` and writes ``dk``/``dv`` once. (A first version added each
  window's ``dk``/``dv`` with fp32 atomics: 5-20x slower than the forward on an H100.)
* Eager calls go through a ``torch.autograd.Function``; under ``torch.compile`` the kernels are the custom ops
  ``metamixer::halo_attention_fwd`` / ``metamixer::halo_attention_bwd`` (opaque, backward registered).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import autocast_dtype, register_op, resolve_impl, triton_available

__all__ = ["halo_attention", "halo_attention_explicit", "halo_attention_reference"]


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
    scale = k.shape[2] ** -0.5 if scale is None else scale
    return halo_attention_explicit(q, k, v, q, rel_pos_h, rel_pos_w, block_size, halo_size, stride, scale)


def halo_attention_explicit(qc: torch.Tensor, kc: torch.Tensor, v: torch.Tensor, qr: torch.Tensor,
                            rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, block_size: int, halo_size: int,
                            stride: int, scale: float, probs_fn: Optional[Callable] = None) -> torch.Tensor:
    """The reference's math, without its argument checks, with the content and relative-position queries apart
    and a hook on the probabilities (OFQ's quantized HaloNet attention, ``backbones.quant.attention``): content
    logits ``scale * <qc, kc>`` (``qc`` ``(B, h or 1, dc, H/s, W/s)``, ``kc`` ``(B, h, dc, H, W)``), relative
    logits from ``qr`` ``(B, h, dqk, H/s, W/s)``; the reference passes ``qc = qr = q``, ``kc = k``."""
    B, nh, dv, H, W = v.shape
    if H % block_size or W % block_size:
        raise ValueError(f"halo attention needs the feature map ({H}x{W}) divisible by block_size={block_size}")
    bq = block_size // stride
    win = block_size + 2 * halo_size
    nbh, nbw = H // block_size, W // block_size

    def blocks(t: torch.Tensor) -> torch.Tensor:  # queries gathered into blocks once: (B, h, nbh, nbw, bq, bq, d)
        return t.unflatten(3, (nbh, bq)).unflatten(5, (nbw, bq)).permute(0, 1, 3, 5, 4, 6, 2).contiguous()

    def windows(t: torch.Tensor) -> torch.Tensor:
        # (B, nh, d, H, W) -> zero halo -> overlapping windows (B, nh, nbh, nbw, win*win, d)
        t = F.pad(t, [halo_size] * 4).unfold(3, win, block_size).unfold(4, win, block_size)
        return t.permute(0, 1, 3, 4, 5, 6, 2).flatten(4, 5)

    qb = blocks(qr)
    qcb = qb if qc is qr else blocks(qc)
    kw, vw = windows(kc), windows(v)

    # content logits (B, nh, nbh, nbw, bq*bq, win*win)
    attn = torch.matmul(qcb.flatten(4, 5), kw.transpose(-1, -2)).mul_(scale)

    # relative logits: q against every relative offset (2*win - 1 of them), then for query row qy and key row ky
    # take offset ky - qy + win - 1 (columns likewise); the index is broadcast, not materialised
    rel = torch.arange(win, device=qr.device)[None, :] - torch.arange(bq, device=qr.device)[:, None] + win - 1
    logits_h = torch.matmul(qb, rel_pos_h.t())  # (..., qy, qx, 2*win - 1)
    logits_h = logits_h.gather(-1, rel[:, None, :].expand(*logits_h.shape[:-1], win))  # (..., qy, qx, ky)
    logits_w = torch.matmul(qb, rel_pos_w.t())
    logits_w = logits_w.gather(-1, rel[None, :, :].expand(*logits_w.shape[:-1], win))  # (..., qy, qx, kx)
    attn = attn.view(*attn.shape[:4], bq, bq, win, win)
    attn = attn.add_(logits_h.unsqueeze(-1)).add_(logits_w.unsqueeze(-2))
    attn = attn.flatten(-2).flatten(4, 5).softmax(dim=-1)
    if probs_fn is not None:
        attn = probs_fn(attn)

    out = torch.matmul(attn, vw)  # (B, nh, nbh, nbw, bq*bq, dv)
    # fold blocks back to NCHW: (B, nh, dv, nbh, bq, nbw, bq) -> (B, nh*dv, H/stride, W/stride)
    out = out.view(B, nh, nbh, nbw, bq, bq, dv).permute(0, 1, 6, 2, 4, 3, 5)
    return out.reshape(B, nh * dv, nbh * bq, nbw * bq)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One program holds the whole window (<= 16 x 16 keys) and the q/k head; in fp32 (IEEE dots) a q/k head of 64
# needs more shared memory than an H100 block has (ptxas for sm_90: 253 KiB), so fp32 takes heads <= 32.
# Blocks of <= 8 x 8 queries/keys (every HaloNet and timm hybrid uses 7 or 8): larger key blocks make the
# key-stationary backward's tiles 128 x 128, which ptxas did not finish compiling within minutes on an H100.
_MAX_WIN, _MAX_BLOCK, _MAX_DQK, _MAX_DQK_FP32 = 16, 8, 128, 32


def _kernel_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute in: the autocast dtype under autocast (the reference's matmuls would be
    cast to it), else the inputs' own."""
    return autocast_dtype(q) or q.dtype


def _triton_supported(dt: torch.dtype, tensors, dqk: int, block_size: int, halo_size: int) -> bool:
    return (dt in _KERNEL_DTYPES and all(t.dtype in _KERNEL_DTYPES for t in tensors)
            and block_size + 2 * halo_size <= _MAX_WIN and block_size <= _MAX_BLOCK
            and dqk <= (_MAX_DQK_FP32 if dt == torch.float32 else _MAX_DQK))


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                   block_size: int, halo_size: int, stride: int = 1,
                   scale: Optional[float] = None, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: the reference, or the Triton kernels when forced (``impl='triton'`` / ``METAMIXER_OPS_IMPL``).

    ``auto`` takes the kernels on CUDA (``benchmarks/bench_models.py``, H100, bf16, batch 256: halo_h1 trains 2.2x
    faster than on the reference).
    """
    tensors = (q, k, v, rel_pos_h, rel_pos_w)
    dt = _kernel_dtype(q)
    supported = _triton_supported(dt, tensors, q.shape[2], block_size, halo_size)
    if resolve_impl(impl, q, supported,
                    op="halo_attention", args=(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride,
                                             scale)) == "reference":
        return halo_attention_reference(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride, scale)
    _check_args(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride)
    scale = float(q.shape[2] ** -0.5 if scale is None else scale)
    if autocast_dtype(q) is None and any(t.dtype != dt for t in tensors):
        raise TypeError(f"halo_attention: operand dtypes differ ({', '.join(str(t.dtype) for t in tensors)})")
    q, k, v, rel_pos_h, rel_pos_w = (t.to(dt) for t in tensors)
    with torch.autocast(q.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return torch.ops.metamixer.halo_attention_fwd(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size,
                                                          stride, scale)[0]
        return _HaloFunction.apply(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride, scale)


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _halo_block(Q, K, RH, RW, pid_bh, pid_blk, pid_c, NH, H, W, NBW, DQK, scale,
                    sqb, sqh, sqd, sqy, sqx, skb, skh, skd, sky, skx,
                    BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr,
                    BQC: tl.constexpr, WP: tl.constexpr, WK: tl.constexpr, RP: tl.constexpr, DQP: tl.constexpr,
                    PREC: tl.constexpr, ONEHOT: tl.constexpr):
        """What both passes need for one (batch*head, block, chunk of BQC of the block's queries): the queries ``q``
        (BQC x DQP), the window's keys transposed ``kt`` (DQP x WP*WP, zero outside the map), the transposed
        relative tables, the logits ``s`` (padded window positions -inf), index vectors and masks."""
        b = (pid_bh // NH).to(tl.int64)
        h = (pid_bh % NH).to(tl.int64)
        bi = pid_blk // NBW
        bj = pid_blk % NBW
        p = pid_c * BQC + tl.arange(0, BQC)  # query p of the block: (qy, qx) = divmod(p, BQ)
        qy = p // BQ
        qx = p % BQ
        qmask = p < BQ * BQ
        t = tl.arange(0, WP * WP)  # window position t: (ky, kx) = divmod(t, WP)
        ky = t // WP
        kx = t % WP
        y = bi * BS - HALO + ky
        x = bj * BS - HALO + kx
        kvalid = (ky < WIN) & (kx < WIN)
        inimg = kvalid & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        dq = tl.arange(0, DQP)
        dqm = dq < DQK
        q_off = (bi * BQ + qy) * sqy + (bj * BQ + qx) * sqx
        q = tl.load(Q + b * sqb + h * sqh + q_off[:, None] + (dq * sqd)[None, :],
                    mask=qmask[:, None] & dqm[None, :], other=0.0)
        kt = tl.load(K + b * skb + h * skh + (dq * skd)[:, None] + (y * sky + x * skx)[None, :],
                     mask=dqm[:, None] & inimg[None, :], other=0.0)
        r = tl.arange(0, RP)
        rmask = (r < 2 * WIN - 1)[None, :] & dqm[:, None]
        rht = tl.load(RH + r[None, :] * DQK + dq[:, None], mask=rmask, other=0.0)
        rwt = tl.load(RW + r[None, :] * DQK + dq[:, None], mask=rmask, other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * scale
        # relative logits: q . rel_pos_h[ky - qy + WIN - 1] = (q @ rel_pos_h^T)[p, ky - qy + WIN - 1]
        ah = tl.dot(q, rht, input_precision=PREC)  # (BQC, RP)
        aw = tl.dot(q, rwt, input_precision=PREC)
        # per window row ky (column kx): (BQC, WK), then spread over the WP*WP positions: with one-hot matmuls
        # (ONEHOT) or broadcast through a (BQC, WP, WP) view. The launchers choose per kernel from H100 timings
        # (_launch_fwd, _launch_bwd). Windows narrower than 8 always take the one-hot matmuls: with the view, a GPU
        # run failed test_matches_reference's case whose window is 4 wide (WP=4, one query per block); not
        # investigated further.
        w = tl.arange(0, WK if ONEHOT else WP)  # WK = max(WP, 16) for tl.dot; rows >= WP match no position
        eh = tl.gather(ah, tl.minimum(tl.maximum(w[None, :] - qy[:, None] + WIN - 1, 0), RP - 1), axis=1)
        ew = tl.gather(aw, tl.minimum(tl.maximum(w[None, :] - qx[:, None] + WIN - 1, 0), RP - 1), axis=1)
        onehot_y = (ky[None, :] == w[:, None]).to(q.dtype)  # (WK, WP*WP) under ONEHOT, else unused
        onehot_x = (kx[None, :] == w[:, None]).to(q.dtype)
        if ONEHOT:
            s += (tl.dot(eh.to(q.dtype), onehot_y, input_precision=PREC)
                  + tl.dot(ew.to(q.dtype), onehot_x, input_precision=PREC))
        else:  # rounded to the input dtype as the one-hot matmul's operands are
            s += tl.reshape(eh.to(q.dtype).to(tl.float32)[:, :, None] + ew.to(q.dtype).to(tl.float32)[:, None, :],
                            (BQC, WP * WP))
        s = tl.where(kvalid[None, :], s, float("-inf"))
        return q, kt, rht, rwt, s, b * NH + h, b, h, bi, bj, qy, qx, qmask, y, x, inimg, dq, dqm, r, onehot_y, onehot_x

    @triton.jit
    def _halo_fwd_kernel(Q, K, V, RH, RW, Out, Lse, NH, H, W, HQ, WQ, NBW, DQK, DV, scale,
                         sqb, sqh, sqd, sqy, sqx, skb, skh, skd, sky, skx, svb, svh, svd, svy, svx,
                         BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr,
                         BQC: tl.constexpr, WP: tl.constexpr, WK: tl.constexpr, RP: tl.constexpr, DQP: tl.constexpr,
                         BDV: tl.constexpr, PREC: tl.constexpr, ONEHOT: tl.constexpr):
        """Out (B, NH, DV, HQ, WQ) contiguous, Lse (B, NH, HQ, WQ) fp32: softmax over the whole window at once,
        then the probabilities times v, BDV value channels at a time."""
        pid_bh, pid_blk, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q, kt, rht, rwt, s, bh, b, h, bi, bj, qy, qx, qmask, y, x, inimg, dq, dqm, r, _, _ = _halo_block(
            Q, K, RH, RW, pid_bh, pid_blk, pid_c, NH, H, W, NBW, DQK, scale,
            sqb, sqh, sqd, sqy, sqx, skb, skh, skd, sky, skx, BS, BQ, HALO, WIN, BQC, WP, WK, RP, DQP, PREC, ONEHOT)
        m = tl.max(s, axis=1)
        e = tl.exp(s - m[:, None])
        denom = tl.sum(e, axis=1)
        prob = (e / denom[:, None]).to(q.dtype)
        pix = (bi * BQ + qy) * WQ + bj * BQ + qx
        v_ptr = V + b * svb + h * svh + (y * svy + x * svx)[:, None]
        o_ptr = Out + bh * DV * HQ * WQ + pix[:, None]
        for c0 in range(0, DV, BDV):
            dv = c0 + tl.arange(0, BDV)
            dvm = dv < DV
            v = tl.load(v_ptr + (dv * svd)[None, :], mask=inimg[:, None] & dvm[None, :], other=0.0)
            o = tl.dot(prob, v, input_precision=PREC)  # (BQC, BDV)
            tl.store(o_ptr + (dv * HQ * WQ)[None, :], o.to(Out.dtype.element_ty), mask=qmask[:, None] & dvm[None, :])
        tl.store(Lse + bh * HQ * WQ + pix, m + tl.log(denom), mask=qmask)

    @triton.jit
    def _halo_bwd_dq_kernel(Q, K, V, RH, RW, Out, Lse, GO, DQ, Delta, DR, NH, H, W, HQ, WQ, NBW, DQK, DV, scale,
                         sqb, sqh, sqd, sqy, sqx, skb, skh, skd, sky, skx, svb, svh, svd, svy, svx,
                         sgb, sgh, sgd, sgy, sgx,
                         BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr,
                         BQC: tl.constexpr, WP: tl.constexpr, WK: tl.constexpr, RP: tl.constexpr, DQP: tl.constexpr,
                         BDV: tl.constexpr, PREC: tl.constexpr, ONEHOT: tl.constexpr):
        """Query-stationary half of the backward: recompute the block's probabilities from Lse; store DQ (like Q,
        contiguous), Delta = rowsum(dO * O) (fp32, like Lse; the key-stationary kernel reads it) and DR (fp32,
        (programs, 2, RP, DQP)) this program's relative-table grads."""
        pid_bh, pid_blk, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        block = _halo_block(Q, K, RH, RW, pid_bh, pid_blk, pid_c, NH, H, W, NBW, DQK, scale,
                            sqb, sqh, sqd, sqy, sqx, skb, skh, skd, sky, skx, BS, BQ, HALO, WIN, BQC, WP, WK, RP, DQP,
                            PREC, ONEHOT)
        q, kt, rht, rwt, s, bh, b, h, bi, bj, qy, qx, qmask, y, x, inimg, dq, dqm, r, onehot_y, onehot_x = block
        dt = q.dtype
        pix = (bi * BQ + qy) * WQ + bj * BQ + qx
        lse = tl.load(Lse + bh * HQ * WQ + pix, mask=qmask, other=0.0)
        prob = tl.exp(s - lse[:, None])  # (BQC, WP*WP); padded window positions: exp(-inf) = 0
        v_ptr = V + b * svb + h * svh + (y * svy + x * svx)[:, None]
        o_ptr = Out + bh * DV * HQ * WQ + pix[:, None]
        g_ptr = GO + b * sgb + h * sgh + ((bi * BQ + qy) * sgy + (bj * BQ + qx) * sgx)[:, None]
        delta = tl.zeros((BQC,), dtype=tl.float32)
        dp = tl.zeros((BQC, WP * WP), dtype=tl.float32)
        for c0 in range(0, DV, BDV):  # dp = dO v^T and delta = rowsum(dO * O), BDV value channels at a time
            dv = c0 + tl.arange(0, BDV)
            dvm = dv < DV
            om = qmask[:, None] & dvm[None, :]
            o = tl.load(o_ptr + (dv * HQ * WQ)[None, :], mask=om, other=0.0).to(tl.float32)
            go = tl.load(g_ptr + (dv * sgd)[None, :], mask=om, other=0.0).to(dt)
            v = tl.load(v_ptr + (dv * svd)[None, :], mask=inimg[:, None] & dvm[None, :], other=0.0)
            delta += tl.sum(go.to(tl.float32) * o, axis=1)
            dp += tl.dot(go, tl.trans(v), input_precision=PREC)
        ds = prob * (dp - delta[:, None])  # gradient of the logits
        dsl = ds.to(dt)
        # relative logits: gradient per (query, ky) summed over kx, then moved to offset r = ky - qy + WIN - 1
        ky_r = r[None, :] + qy[:, None] - (WIN - 1)  # (BQC, RP): the ky that reads offset r
        kx_r = r[None, :] + qx[:, None] - (WIN - 1)
        if ONEHOT:
            dsh = tl.dot(dsl, tl.trans(onehot_y), input_precision=PREC)  # (BQC, WK)
            dsw = tl.dot(dsl, tl.trans(onehot_x), input_precision=PREC)
        else:
            ds3 = tl.reshape(dsl.to(tl.float32), (BQC, WP, WP))
            dsh = tl.sum(ds3, axis=2)  # (BQC, WP)
            dsw = tl.sum(ds3, axis=1)
        dah = tl.gather(dsh, tl.minimum(tl.maximum(ky_r, 0), dsh.shape[1] - 1), axis=1)
        daw = tl.gather(dsw, tl.minimum(tl.maximum(kx_r, 0), dsw.shape[1] - 1), axis=1)
        dah = tl.where((ky_r >= 0) & (ky_r < WIN), dah, 0.0).to(dt)
        daw = tl.where((kx_r >= 0) & (kx_r < WIN), daw, 0.0).to(dt)
        dqv = (tl.dot(dsl, tl.trans(kt), input_precision=PREC) * scale
               + tl.dot(dah, tl.trans(rht), input_precision=PREC) + tl.dot(daw, tl.trans(rwt), input_precision=PREC))
        tl.store(DQ + bh * DQK * HQ * WQ + pix[:, None] + (dq * HQ * WQ)[None, :], dqv.to(DQ.dtype.element_ty),
                 mask=qmask[:, None] & dqm[None, :])
        prog = (pid_bh * tl.num_programs(1) + pid_blk) * tl.num_programs(2) + pid_c
        dr = DR + prog * 2 * RP * DQP + r[:, None] * DQP + dq[None, :]
        tl.store(dr, tl.dot(tl.trans(dah), q, input_precision=PREC))
        tl.store(dr + RP * DQP, tl.dot(tl.trans(daw), q, input_precision=PREC))
        tl.store(Delta + bh * HQ * WQ + pix, delta, mask=qmask)

    @triton.jit
    def _halo_bwd_dkdv_kernel(Q, K, V, RH, RW, Lse, Delta, GO, DK, DVg, NH, H, W, HQ, WQ, NBH, NBW, DQK, DV, scale,
                              sqb, sqh, sqd, sqy, sqx, skb, skh, skd, sky, skx, svb, svh, svd, svy, svx,
                              sgb, sgh, sgd, sgy, sgx,
                              BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr,
                              NR: tl.constexpr, BQP: tl.constexpr, KBP: tl.constexpr, RP: tl.constexpr,
                              DQP: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr):
        """Key-stationary half (no atomics): one program per (batch*head, key block, chunk of BDV value channels)
        owns the block's BS*BS keys and visits every query block whose window covers them (the (2*NR+1)^2
        neighbours, NR = ceil(HALO / BS)), recomputing those queries' probabilities from Lse/Delta:
        dV[keys, chunk] = sum P^T dO, and in chunk 0 dK[keys] = scale * sum dS^T q. Stores DK/DVg in the
        inputs' dtype, contiguous (B, NH, D, H, W)."""
        pid_bh, pid_blk, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b = (pid_bh // NH).to(tl.int64)
        h = (pid_bh % NH).to(tl.int64)
        bi = pid_blk // NBW
        bj = pid_blk % NBW
        t = tl.arange(0, KBP)  # key t of the block: (ty, tx) = divmod(t, BS)
        ty = t // BS
        tx = t % BS
        tmask = t < BS * BS
        yk = bi * BS + ty
        xk = bj * BS + tx
        dq = tl.arange(0, DQP)
        dqm = dq < DQK
        kt = tl.load(K + b * skb + h * skh + (dq * skd)[:, None] + (yk * sky + xk * skx)[None, :],
                     mask=dqm[:, None] & tmask[None, :], other=0.0)  # (DQP, KBP)
        r = tl.arange(0, RP)
        rmask = (r < 2 * WIN - 1)[None, :] & dqm[:, None]
        rht = tl.load(RH + r[None, :] * DQK + dq[:, None], mask=rmask, other=0.0)
        rwt = tl.load(RW + r[None, :] * DQK + dq[:, None], mask=rmask, other=0.0)
        p = tl.arange(0, BQP)  # query p of a neighbour block: (qy, qx) = divmod(p, BQ)
        qy = p // BQ
        qx = p % BQ
        pmask = p < BQ * BQ
        c_own = pid_c * BDV + tl.arange(0, BDV)
        c_own_m = c_own < DV
        dk_acc = tl.zeros((KBP, DQP), dtype=tl.float32)
        dv_acc = tl.zeros((KBP, BDV), dtype=tl.float32)
        for di in tl.static_range(-NR, NR + 1):
            for dj in tl.static_range(-NR, NR + 1):
                ni = bi + di
                nj = bj + dj
                if (ni >= 0) & (ni < NBH) & (nj >= 0) & (nj < NBW):  # neighbours off the grid: nothing to add
                    # window position of our keys inside the neighbour's window
                    ky = ty - di * BS + HALO
                    kx = tx - dj * BS + HALO
                    inwin = tmask & (ky >= 0) & (ky < WIN) & (kx >= 0) & (kx < WIN)
                    qrow = ni * BQ + qy
                    qcol = nj * BQ + qx
                    q = tl.load(Q + b * sqb + h * sqh + (qrow * sqy + qcol * sqx)[:, None] + (dq * sqd)[None, :],
                                mask=pmask[:, None] & dqm[None, :], other=0.0)  # (BQP, DQP)
                    pix = qrow * WQ + qcol
                    lse = tl.load(Lse + pid_bh * HQ * WQ + pix, mask=pmask, other=0.0)
                    delta = tl.load(Delta + pid_bh * HQ * WQ + pix, mask=pmask, other=0.0)
                    s = tl.dot(q, kt, input_precision=PREC) * scale  # (BQP, KBP)
                    ah = tl.dot(q, rht, input_precision=PREC)  # (BQP, RP)
                    aw = tl.dot(q, rwt, input_precision=PREC)
                    ih = tl.minimum(tl.maximum(ky[None, :] - qy[:, None] + WIN - 1, 0), RP - 1)
                    iw = tl.minimum(tl.maximum(kx[None, :] - qx[:, None] + WIN - 1, 0), RP - 1)
                    s += tl.gather(ah, ih, axis=1) + tl.gather(aw, iw, axis=1)
                    valid = pmask[:, None] & inwin[None, :]
                    prob = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
                    g_ptr = GO + b * sgb + h * sgh + (qrow * sgy + qcol * sgx)[:, None]
                    v_ptr = V + b * svb + h * svh + (yk * svy + xk * svx)[None, :]
                    go = tl.load(g_ptr + (c_own * sgd)[None, :], mask=pmask[:, None] & c_own_m[None, :],
                                 other=0.0).to(q.dtype)
                    dv_acc += tl.dot(tl.trans(prob.to(q.dtype)), go, input_precision=PREC)
                    if pid_c == 0:  # dK (only the first value chunk's program): dp = dO v^T over all value channels
                        dp = tl.zeros((BQP, KBP), dtype=tl.float32)
                        for c0 in range(0, DV, BDV):
                            c = c0 + tl.arange(0, BDV)
                            cm = c < DV
                            go = tl.load(g_ptr + (c * sgd)[None, :], mask=pmask[:, None] & cm[None, :],
                                         other=0.0).to(q.dtype)
                            vt = tl.load(v_ptr + (c * svd)[:, None], mask=cm[:, None] & tmask[None, :], other=0.0)
                            dp += tl.dot(go, vt, input_precision=PREC)
                        ds = (prob * (dp - delta[:, None])).to(q.dtype)
                        dk_acc += tl.dot(tl.trans(ds), q, input_precision=PREC)
        pos = (yk * W + xk)[:, None]
        tl.store(DVg + pid_bh * DV * H * W + pos + (c_own * H * W)[None, :], dv_acc.to(DVg.dtype.element_ty),
                 mask=tmask[:, None] & c_own_m[None, :])
        if pid_c == 0:
            tl.store(DK + pid_bh * DQK * H * W + pos + (dq * H * W)[None, :], (dk_acc * scale).to(DK.dtype.element_ty),
                     mask=tmask[:, None] & dqm[None, :])

    def _meta(q, k, v, block_size, halo_size, stride, q_chunk, max_tile):
        """Grid, compile-time constants and sizes. ``q_chunk``: queries per program (a power of two >= 16), a tuning
        knob for ``benchmarks/bench_halo.py``; None: as many as keep the logits tile at ``max_tile`` values (half
        that for fp32). Smaller chunks need fewer registers, but the window is read, and in the backward added,
        once per chunk. Four warps per program for 16-bit inputs with head dims <= 64: on an H100 at halo_h1's
        shapes (bf16, head dims 8-64) they ran the forward 1.0-1.9x and the dq kernel 1.2-3.3x faster than eight,
        although at four ptxas (sm_90) spills in the dq kernel (72-1504 bytes of stack; none at eight): 255
        registers x 4 warps lets two programs share an SM. Eight otherwise (windows wider than 8): at four, fp32
        (head dim 32) compiles to 14.6 KB of stack in the forward (none at eight), bf16 head dim 128 to 472 bytes
        (none at eight); neither was timed."""
        B, nh, dqk, H, W = k.shape
        bq, win = block_size // stride, block_size + 2 * halo_size
        p2 = triton.next_power_of_2
        wp = max(4, p2(win))
        max_tile //= q.element_size() // 2
        bqc = max(16, min(q_chunk or max_tile // (wp * wp), p2(bq * bq)))
        meta = dict(BS=block_size, BQ=bq, HALO=halo_size, WIN=win, BQC=bqc, WP=wp, WK=max(16, wp),
                    RP=max(16, p2(2 * win - 1)),
                    DQP=max(16, p2(dqk)), BDV=min(64, max(16, p2(v.shape[2]))),
                    PREC="ieee" if q.dtype == torch.float32 else "tf32",
                    num_warps=4 if win <= 8 or (q.element_size() == 2 and dqk <= 64) else 8)
        grid = (B * nh, (H // block_size) * (W // block_size), triton.cdiv(bq * bq, bqc))
        return grid, meta, (nh, H, W, H // stride, W // stride, W // block_size, dqk, v.shape[2])

    def _launch_fwd(q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale, q_chunk=None):
        grid, meta, dims = _meta(q, k, v, block_size, halo_size, stride, q_chunk, max_tile=16384)
        B, nh, dv = q.shape[0], q.shape[1], v.shape[2]
        out = q.new_empty(B, nh, dv, q.shape[3], q.shape[4])
        lse = q.new_empty(B, nh, q.shape[3], q.shape[4], dtype=torch.float32)
        # relative logits: one-hot matmuls for head dims > 32, the (queries, WP, WP) view otherwise (H100, halo_h1's
        # shapes, 4 warps: view 958 vs 1026 us at stage 1 (head dim 8); one-hot 53 vs 89 us at stage 4's first
        # block (head dim 64))
        meta["ONEHOT"] = meta["WP"] < 8 or q.shape[2] > 32
        _halo_fwd_kernel[grid](q, k, v, rel_h.contiguous(), rel_w.contiguous(), out, lse, *dims, scale,
                               *q.stride(), *k.stride(), *v.stride(), **meta)
        return out.view(B, nh * dv, q.shape[3], q.shape[4]), lse

    def _launch_bwd(grad, q, k, v, rel_h, rel_w, out, lse, block_size, halo_size, stride, scale, q_chunk=None):
        # 64 queries per program for H1's head dims <= 32, 16 above: the bench_halo.py q_chunk sweep on an H100
        # (eight warps then; at four, 64 queries still beat 32 and 16 by 1.2-1.7x at stages 1-3)
        max_tile = 16384 if q.shape[2] <= 32 else 4096
        grid, meta, dims = _meta(q, k, v, block_size, halo_size, stride, q_chunk, max_tile=max_tile)
        B, nh, dqk = q.shape[:3]
        nhh, H, W, HQ, WQ, nbw, _, dv_ = dims
        go = grad.unflatten(1, (nh, v.shape[2]))  # any strides (e.g. a channels-last gradient)
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        delta = torch.empty_like(lse)
        dr = torch.empty(grid[0] * grid[1] * grid[2], 2, meta["RP"], meta["DQP"], device=q.device,
                         dtype=torch.float32)
        rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
        strides = (*q.stride(), *k.stride(), *v.stride(), *go.stride())
        _halo_bwd_dq_kernel[grid](q, k, v, rel_h, rel_w, out, lse, go, dq, delta, dr, *dims, scale, *strides,
                                  ONEHOT=meta["WP"] < 8, **meta)
        drh, drw = (dr[:, i, :rel_h.shape[0], :dqk].sum(0).to(rel_h.dtype) for i in (0, 1))
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        p2 = triton.next_power_of_2
        kbp = max(16, p2(block_size * block_size))
        bdv = min(max(16, p2(dv_)), max(16, 8192 // kbp))  # the dV accumulator: <= 8K fp32 values per program
        kv_meta = dict(BS=block_size, BQ=meta["BQ"], HALO=halo_size, WIN=meta["WIN"], NR=-(-halo_size // block_size),
                       BQP=max(16, p2(meta["BQ"] ** 2)), KBP=kbp, RP=meta["RP"], DQP=meta["DQP"], BDV=bdv,
                       PREC=meta["PREC"], num_warps=4)
        kv_grid = (grid[0], grid[1], triton.cdiv(dv_, bdv))
        _halo_bwd_dkdv_kernel[kv_grid](q, k, v, rel_h, rel_w, lse, delta, go, dk, dv, nhh, H, W, HQ, WQ,
                                       H // block_size, nbw, dqk, dv_, scale, *strides, **kv_meta)
        return dq, dk, dv, drh, drw

    @torch.library.custom_op("metamixer::halo_attention_fwd", mutates_args=())
    def _halo_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                     rel_pos_w: torch.Tensor, block_size: int, halo_size: int, stride: int,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return _launch_fwd(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride, scale)

    @_halo_fwd_op.register_fake
    def _(q, k, v, rel_pos_h, rel_pos_w, block_size, halo_size, stride, scale):
        B, nh, _, hq, wq = q.shape
        return q.new_empty(B, nh * v.shape[2], hq, wq), q.new_empty(B, nh, hq, wq, dtype=torch.float32)

    @torch.library.custom_op("metamixer::halo_attention_bwd", mutates_args=())
    def _halo_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                     rel_pos_w: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, block_size: int, halo_size: int,
                     stride: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
        return _launch_bwd(grad, q, k, v, rel_pos_h, rel_pos_w, out, lse, block_size, halo_size, stride, scale)

    @_halo_bwd_op.register_fake
    def _(grad, q, k, v, rel_pos_h, rel_pos_w, out, lse, block_size, halo_size, stride, scale):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(rel_pos_h),
                torch.empty_like(rel_pos_w))

    def _setup(ctx, inputs, output):
        q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale = inputs
        ctx.save_for_backward(q, k, v, rel_h, rel_w, *output)
        ctx.args = (block_size, halo_size, stride, scale)

    def _backward(ctx, grad, grad_lse):  # lse is an internal output: its gradient is never used
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        grads = _halo_bwd_op(grad, q, k, v, rel_h, rel_w, out, lse, *ctx.args)
        return (*grads, None, None, None, None)

    _halo_fwd_op.register_autograd(_backward, setup_context=_setup)

    class _HaloFunction(torch.autograd.Function):
        """Eager path: the launchers without the custom-op dispatch overhead (see ops/na2d.py)."""

        @staticmethod
        def forward(ctx, q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale):
            out, lse = _launch_fwd(q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale)
            _setup(ctx, (q, k, v, rel_h, rel_w, block_size, halo_size, stride, scale), (out, lse))
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
            grads = _launch_bwd(grad, q, k, v, rel_h, rel_w, out, lse, *ctx.args)
            return (*grads, None, None, None, None)

register_op("halo_attention", halo_attention)
