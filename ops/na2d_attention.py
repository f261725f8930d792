"""Fused 2-D neighbourhood attention: ``na2d_av(softmax(scale * na2d_qk(q, k) + rpb), v)`` in one kernel per pass.

Semantics: exactly the composition of the unfused NATTEN-0.17 ops of :mod:`ops.na2d` (dilation 1: each pixel's
``k x k`` window shifted inside the map at the borders, never padded; the relative-position bias of tap ``(a, c)``
of pixel ``(i, j)`` is ``rpb[h, kr - i + k - 1, kc - j + k - 1]`` for the neighbour ``(kr, kc)``), with the softmax
over the ``k*k`` taps. :func:`na2d_attention_reference` is the definition (the reference ops composed).

Why fused: with windows close to the map size (OverLoCK-style 13x13 windows on 14x14 maps) the unfused chain
writes and re-reads ``B*heads*H*W*k*k`` logits and probabilities several times per forward+backward, which is what
made it 0.5x FlexAttention there. Here a program takes a tile of up to 8x8 query pixels of one (batch, head) and
walks the box holding all their windows (at most ``(8 + k - 1)^2`` keys, clipped to the map) one key row at a time:
dense scores on tensor cores, masked to each query's window, plus the gathered bias, an online softmax and the
value product, all in registers; only the output and the per-pixel logsumexp are written. The backward recomputes
the probabilities row by row and writes dq per tile; dk, dv and the bias gradient are added with fp32 atomics (per
program for the bias, summed afterwards).

Triton path (``auto`` on CUDA): dilation 1, fp32/fp16/bf16, query/key/value ``[B, heads, H, W, D]`` with any
strides. Measured on an H100 (bf16, forward+backward GPU time, ``benchmarks/bench_attention.py --only na2d``): 726 us
against 2244 us for the unfused Triton chain and 1374 us for FlexAttention at 13x13 windows on 14x14 maps (1.9x
Flex), 1044 us against 4840 us for Flex at 5x5 (4.6x).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._dispatch import interpreting, resolve_impl, triton_available, register_op
from .na2d import _check_window, na2d_av_reference, na2d_qk_reference

__all__ = ["na2d_attention", "na2d_attention_reference"]


def na2d_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int,
                             rpb: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """``na2d_av(softmax(scale * q.k + rpb), v)`` with the reference ops (the definition; any device/dtype)."""
    logits = na2d_qk_reference(q * scale, k, kernel_size, 1, rpb)
    return na2d_av_reference(logits.softmax(-1), v, kernel_size, 1)


def _check(q, k, v, kernel_size, rpb):
    if q.ndim != 5 or q.shape != k.shape or q.shape[:4] != v.shape[:4]:
        raise ValueError(f"na2d_attention: q, k must be [B, heads, H, W, D] and v [B, heads, H, W, Dv] on the same "
                         f"grid; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for length in q.shape[2:4]:
        _check_window(length, kernel_size, 1)
    if rpb is not None and tuple(rpb.shape) != (q.shape[1], 2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(f"rpb must be [heads, {2 * kernel_size - 1}, {2 * kernel_size - 1}], got {tuple(rpb.shape)}")


def na2d_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int,
                   rpb: Optional[torch.Tensor] = None, scale: float = 1.0, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: the fused kernels (``auto`` on CUDA, or ``impl='triton'``), else the reference."""
    _check(q, k, v, kernel_size, rpb)
    supported = all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in (q, k, v))
    if resolve_impl(impl, q, supported,
                    op="na2d_attention", args=(q, k, v, kernel_size, rpb, scale)) == "reference":
        return na2d_attention_reference(q, k, v, kernel_size, rpb, scale)
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    elif not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"na2d_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    with torch.autocast(q.device.type, enabled=False):
        if torch.compiler.is_compiling():  # an opaque custom op with its backward registered
            return torch.ops.metamixer.na2d_attention(q, k, v, rpb, kernel_size, float(scale))[0]
        return _NA2DAttentionFn.apply(q, k, v, rpb, kernel_size, float(scale))


if triton_available():
    import triton
    import triton.language as tl

    from .na2d import _win_start

    @triton.jit
    def _mm(a, b, DT: tl.constexpr, IEEE: tl.constexpr):
        """a @ b with fp32 accumulation: exact fp32 products under IEEE, else tensor cores in the input dtype."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a.to(DT), b.to(DT))

    @triton.jit
    def _na2d_tile(Q, pid_bg, pid_t, G, H, W, D, sqb, sqg, sqh, sqw, sqd, KS: tl.constexpr, TH: tl.constexpr,
                   TW: tl.constexpr, TQ: tl.constexpr, KCP: tl.constexpr, DP: tl.constexpr):
        """A program's tile of query pixels and the box holding all their windows: the box starts at the first
        query's window and has ``n_rows`` key rows of ``KCP`` (padded) columns; per query the window's first row /
        column, the in-window mask of the box columns and the bias column index (both the same for every row)."""
        b = (pid_bg // G).to(tl.int64)
        g = (pid_bg % G).to(tl.int64)
        i0 = (pid_t // tl.cdiv(W, TW)) * TH
        j0 = (pid_t % tl.cdiv(W, TW)) * TW
        p = tl.arange(0, TQ)
        qi = i0 + p // TW
        qj = j0 + p % TW
        qmask = (p < TH * TW) & (qi < H) & (qj < W)
        si = _win_start(qi, H, KS, 1)
        sj = _win_start(qj, W, KS, 1)
        r_base = _win_start(i0, H, KS, 1)
        n_rows = tl.minimum(tl.minimum(TH, H - i0) + KS - 1, H - r_base)
        kc = _win_start(j0, W, KS, 1) + tl.arange(0, KCP)
        colvalid = ((kc[None, :] >= sj[:, None]) & (kc[None, :] < sj[:, None] + KS) & (kc < W)[None, :]
                    & qmask[:, None])
        bias_col = kc[None, :] - qj[:, None] + KS - 1
        d = tl.arange(0, DP)
        dm = d < D
        q = tl.load(Q + b * sqb + g * sqg + (qi * sqh + qj * sqw)[:, None] + (d * sqd)[None, :],
                    mask=qmask[:, None] & dm[None, :], other=0.0)
        return b, g, qi, qj, qmask, si, r_base, n_rows, kc, colvalid, bias_col, d, dm, q

    @triton.jit
    def _na2d_row_scores(q, K, RPB, b, g, kr, kc, qi, si, colvalid, bias_col, H, W, D, scale, skb, skg, skh, skw,
                         skd, KS: tl.constexpr, KCP: tl.constexpr, DP: tl.constexpr, HAS_RPB: tl.constexpr,
                         DT: tl.constexpr, IEEE: tl.constexpr):
        """Scores of the queries against key row ``kr`` of the box: (TQ, KCP), -inf outside each window; the row's
        keys transposed (DP, KCP), the in-window mask, the bias indices and which box columns are in the map."""
        d = tl.arange(0, DP)
        kin = (kc < W) & (kc * 0 + kr < H)
        kt = tl.load(K + b * skb + g * skg + kr * skh + (kc * skw)[None, :] + (d * skd)[:, None],
                     mask=(d < D)[:, None] & kin[None, :], other=0.0)
        valid = colvalid & ((kr >= si) & (kr < si + KS))[:, None]
        s = _mm(q, kt, DT, IEEE) * scale
        bias_idx = ((kr - qi + KS - 1) * (2 * KS - 1))[:, None] + bias_col
        if HAS_RPB:
            s += tl.load(RPB + g * (2 * KS - 1) * (2 * KS - 1) + bias_idx, mask=valid, other=0.0).to(tl.float32)
        return tl.where(valid, s, float("-inf")), kt, valid, bias_idx, kin

    @triton.jit
    def _na2d_fused_fwd_kernel(Q, K, V, RPB, Out, Lse, G, H, W, D, DV, scale,
                               sqb, sqg, sqh, sqw, sqd, skb, skg, skh, skw, skd, svb, svg, svh, svw, svd,
                               KS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, TQ: tl.constexpr,
                               KCP: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, HAS_RPB: tl.constexpr,
                               IEEE: tl.constexpr):
        """Out [B, G, H, W, DV] contiguous, Lse [B, G, H, W] fp32: an online softmax over the box's key rows."""
        pid_bg, pid_t = tl.program_id(0), tl.program_id(1)
        DT: tl.constexpr = Q.dtype.element_ty
        b, g, qi, qj, qmask, si, r_base, n_rows, kc, colvalid, bias_col, d, dm, q = _na2d_tile(
            Q, pid_bg, pid_t, G, H, W, D, sqb, sqg, sqh, sqw, sqd, KS, TH, TW, TQ, KCP, DP)
        dv = tl.arange(0, DVP)
        dvm = dv < DV
        m_i = tl.full((TQ,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((TQ,), dtype=tl.float32)
        acc = tl.zeros((TQ, DVP), dtype=tl.float32)
        for rr in range(0, n_rows):
            kr = r_base + rr
            s, kt, valid, bias_idx, kin = _na2d_row_scores(q, K, RPB, b, g, kr, kc, qi, si, colvalid, bias_col, H, W, D,
                                                      scale, skb, skg, skh, skw, skd, KS, KCP, DP, HAS_RPB, DT, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key of this query's window seen yet
            alpha = tl.exp(m_i - m_use)
            pr = tl.exp(s - m_use[:, None])
            v = tl.load(V + b * svb + g * svg + kr * svh + (kc * svw)[:, None] + (dv * svd)[None, :],
                        mask=kin[:, None] & dvm[None, :], other=0.0)
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            acc = acc * alpha[:, None] + _mm(pr, v, DT, IEEE)
            m_i = m_new
        l_i = tl.where(qmask, l_i, 1.0)  # padded query rows saw no key
        pix = (pid_bg.to(tl.int64) * H + qi) * W + qj
        tl.store(Out + pix[:, None] * DV + dv[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
                 mask=qmask[:, None] & dvm[None, :])
        tl.store(Lse + pix, m_i + tl.log(l_i), mask=qmask)

    @triton.jit
    def _na2d_fused_bwd_kernel(Q, K, V, RPB, Out, Lse, GO, DQ, DK, DVg, DRPB, G, H, W, D, DV, scale,
                               sqb, sqg, sqh, sqw, sqd, skb, skg, skh, skw, skd, svb, svg, svh, svw, svd,
                               sgb, sgg, sgh, sgw, sgd,
                               KS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, TQ: tl.constexpr,
                               KCP: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, HAS_RPB: tl.constexpr,
                               IEEE: tl.constexpr):
        """DQ like Out's layout ([B, G, H, W, D]); DK, DVg fp32 [B, G, H, W, D|DV] accumulated with atomics; DRPB
        fp32 [programs, (2k-1)^2] this program's bias gradient. Key row by key row, as the forward."""
        pid_bg, pid_t = tl.program_id(0), tl.program_id(1)
        DT: tl.constexpr = Q.dtype.element_ty
        b, g, qi, qj, qmask, si, r_base, n_rows, kc, colvalid, bias_col, d, dm, q = _na2d_tile(
            Q, pid_bg, pid_t, G, H, W, D, sqb, sqg, sqh, sqw, sqd, KS, TH, TW, TQ, KCP, DP)
        pix = (pid_bg.to(tl.int64) * H + qi) * W + qj
        lse = tl.load(Lse + pix, mask=qmask, other=0.0)
        dv = tl.arange(0, DVP)
        dvm = dv < DV
        om = qmask[:, None] & dvm[None, :]
        go = tl.load(GO + b * sgb + g * sgg + (qi * sgh + qj * sgw)[:, None] + (dv * sgd)[None, :], mask=om,
                     other=0.0)
        o = tl.load(Out + pix[:, None] * DV + dv[None, :], mask=om, other=0.0)
        delta = tl.sum(go.to(tl.float32) * o.to(tl.float32), axis=1)
        dq = tl.zeros((TQ, DP), dtype=tl.float32)
        prog = (pid_bg * tl.num_programs(1) + pid_t).to(tl.int64)
        for rr in range(0, n_rows):
            kr = r_base + rr
            s, kt, valid, bias_idx, kin = _na2d_row_scores(q, K, RPB, b, g, kr, kc, qi, si, colvalid, bias_col, H, W, D,
                                                      scale, skb, skg, skh, skw, skd, KS, KCP, DP, HAS_RPB, DT, IEEE)
            pr = tl.exp(s - lse[:, None])  # 0 outside the windows
            vt = tl.load(V + b * svb + g * svg + kr * svh + (kc * svw)[None, :] + (dv * svd)[:, None],
                         mask=dvm[:, None] & kin[None, :], other=0.0)  # (DVP, KCP)
            ds = pr * (_mm(go, vt, DT, IEEE) - delta[:, None])  # gradient of the (scaled, biased) scores
            dq += _mm(ds, tl.trans(kt), DT, IEEE)
            kpix = (pid_bg.to(tl.int64) * H + kr) * W + kc
            tl.atomic_add(DK + kpix[:, None] * D + d[None, :], _mm(tl.trans(ds), q, DT, IEEE) * scale,
                          mask=kin[:, None] & dm[None, :])
            tl.atomic_add(DVg + kpix[:, None] * DV + dv[None, :], _mm(tl.trans(pr), go, DT, IEEE),
                          mask=kin[:, None] & dvm[None, :])
            if HAS_RPB:
                tl.atomic_add(DRPB + prog * (2 * KS - 1) * (2 * KS - 1) + bias_idx, ds, mask=valid)
        tl.store(DQ + pix[:, None] * D + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=qmask[:, None] & dm[None, :])

    def _meta(q, v, kernel_size, rpb):
        B, G, H, W, D = q.shape
        p2 = triton.next_power_of_2
        th, tw = min(8, H), min(8, W)
        meta = dict(KS=kernel_size, TH=th, TW=tw, TQ=max(16, p2(th * tw)),
                    KCP=max(16, p2(min(tw + kernel_size - 1, W))),  # a box row, padded (tl.dot needs >= 16)
                    DP=max(16, p2(D)), DVP=max(16, p2(v.shape[-1])), HAS_RPB=rpb is not None,
                    IEEE=q.dtype == torch.float32 or interpreting(), num_warps=4)
        return (B * G, triton.cdiv(H, th) * triton.cdiv(W, tw)), meta

    def _fwd(q, k, v, rpb, kernel_size, scale):
        B, G, H, W, D = q.shape
        grid, meta = _meta(q, v, kernel_size, rpb)
        out = q.new_empty(B, G, H, W, v.shape[-1])
        lse = torch.empty(B, G, H, W, device=q.device, dtype=torch.float32)
        _na2d_fused_fwd_kernel[grid](q, k, v, rpb.contiguous() if rpb is not None else q, out, lse, G, H, W, D,
                                     v.shape[-1], scale, *q.stride(), *k.stride(), *v.stride(), **meta)
        return out, lse

    def _bwd(grad, q, k, v, rpb, out, lse, kernel_size, scale):
        B, G, H, W, D = q.shape
        grid, meta = _meta(q, v, kernel_size, rpb)
        dq = torch.empty(B, G, H, W, D, device=q.device, dtype=q.dtype)
        dk = torch.zeros(B, G, H, W, D, device=q.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        ks = 2 * kernel_size - 1
        drpb = torch.zeros(grid[0] * grid[1] if rpb is not None else 1, ks * ks, device=q.device,
                           dtype=torch.float32)
        _na2d_fused_bwd_kernel[grid](q, k, v, rpb.contiguous() if rpb is not None else q, out, lse, grad, dq, dk, dv,
                                     drpb, G, H, W, D, v.shape[-1], scale, *q.stride(), *k.stride(), *v.stride(),
                                     *grad.stride(), **meta)
        g_rpb = drpb.view(B, G, grid[1], ks, ks).sum((0, 2)).to(rpb.dtype) if rpb is not None else q.new_empty(0)
        return dq, dk.to(k.dtype), dv.to(v.dtype), g_rpb

    @torch.library.custom_op("metamixer::na2d_attention", mutates_args=())
    def _na2d_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
                           kernel_size: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns the output and the fp32 logsumexp (kept for the backward)."""
        return _fwd(q, k, v, rpb, kernel_size, scale)

    @_na2d_attention_op.register_fake
    def _(q, k, v, rpb, kernel_size, scale):
        return q.new_empty(*q.shape[:4], v.shape[-1]), q.new_empty(q.shape[:4], dtype=torch.float32)

    @torch.library.custom_op("metamixer::na2d_attention_backward", mutates_args=())
    def _na2d_attention_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               rpb: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, kernel_size: int,
                               scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _bwd(grad, q, k, v, rpb, out, lse, kernel_size, scale)

    @_na2d_attention_bwd_op.register_fake
    def _(grad, q, k, v, rpb, out, lse, kernel_size, scale):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                torch.empty_like(rpb) if rpb is not None else q.new_empty(0))

    def _setup_context(ctx, inputs, output):
        q, k, v, rpb, kernel_size, scale = inputs
        ctx.save_for_backward(q, k, v, rpb, *output)
        ctx.kernel_size, ctx.scale = kernel_size, scale
        ctx.mark_non_differentiable(output[1])

    def _grads(bwd, ctx, grad):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        dq, dk, dv, drpb = bwd(grad, q, k, v, rpb, out, lse, ctx.kernel_size, ctx.scale)
        return dq, dk, dv, (drpb if rpb is not None else None), None, None

    def _backward(ctx, grad, _grad_lse):
        return _grads(torch.ops.metamixer.na2d_attention_backward, ctx, grad)

    _na2d_attention_op.register_autograd(_backward, setup_context=_setup_context)

    class _NA2DAttentionFn(torch.autograd.Function):  # eager: less per-call overhead than the custom op
        @staticmethod
        def forward(ctx, q, k, v, rpb, kernel_size, scale):
            out, lse = _fwd(q, k, v, rpb, kernel_size, scale)
            ctx.save_for_backward(q, k, v, rpb, out, lse)
            ctx.kernel_size, ctx.scale = kernel_size, scale
            return out

        @staticmethod
        def backward(ctx, grad):
            return _grads(_bwd, ctx, grad)

register_op("na2d_attention", na2d_attention)
