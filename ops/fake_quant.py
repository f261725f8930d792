"""Fake quantization for quantization-aware training (OFQ): the StatsQ weight quantizer and the LSQ quantizer.

Both return a tensor of the input's shape and dtype holding de-quantized values (``scale * integer``); their
gradients are straight-through estimators exactly as in the official OFQ code (nbasyl/OFQ, ``src/quantization``).

StatsQ (``statsq_fake_quant_reference(w, bits)``), weights only, one scale per output channel (dim 0):
    s   = 2 * mean(|w|) over all dims but 0                      (detached: no gradient flows into s)
    c   = clamp(w / s, -1, 1 - 1e-6)                             (official ``clip_val = 2``: +-clip_val/2)
    n   = 2 ** (bits - 1)
    w_q = s * ((round(c * n - 0.5) + 0.5) / n)                   (2 ** bits half-integer levels (k + 0.5) / n,
                                                                  k in [-n, n - 1]; round = half to even)
    dL/dw = dL/dw_q                                              (identity STE, also where w was clipped)

LSQ (``lsq_fake_quant_reference(x, step, bits, signed, dim, grad_scale)``): ``step`` holds one step size per index
of ``x``'s dimension ``dim`` (``dim=None``: one step for the whole tensor). Range ``[Qn, Qp]`` =
``[-2**(bits-1), 2**(bits-1) - 1]`` (signed) or ``[0, 2**bits - 1]`` (unsigned).
    s   = max(step, 1e-5)                                        (value clipped, gradient passed through)
    v   = x / s
    y   = round(clamp(v, Qn, Qp)) * s
    dL/dx    = dL/dy * [Qn < v < Qp]
    dL/dstep = grad_scale * sum over the channel's elements of dL/dy * (round(v) - v  if Qn < v < Qp
                                                                        else clamp(v, Qn, Qp))
(the LSQ paper's gradients; the boundaries count as clipped, as ``torch.clamp``'s backward does in this torch)
``grad_scale`` is LSQ's step-gradient scale; the OFQ quantizers pass ``1 / sqrt(Qp * elements per step)``.
The straight-through helpers are written so that values are exact (``a + (b - b.detach())``; the official
``a.detach() - b.detach() + b`` can differ from ``a`` in the last bit). Both references compute in float32 (float64 inputs in float64) and cast back to the input dtype (under bf16 autocast the official code would
quantize in bf16; we keep the step arithmetic in fp32).

Triton path (``impl='triton'``, or ``auto`` on CUDA, float16/bfloat16/float32): StatsQ takes the per-channel scale
from PyTorch (one reduction) and applies the element-wise quantizer in one kernel; its backward is the identity
(no kernel). LSQ views ``x`` (made contiguous) as ``(outer, C, inner)`` around ``dim``: the forward kernel writes
``y``; the backward kernel writes ``dL/dx`` and reduces each tile's step-gradient per channel, adding it into an
fp32 buffer with atomics. Rounding is half-to-even in both paths, divisions are IEEE-rounded (``div_rn``).
Both kernels are ``torch.library.custom_op``s (``metamixer::statsq_fake_quant``, ``metamixer::lsq_fake_quant``)
with registered autograd: ``torch.compile`` treats them as opaque ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._dispatch import resolve_impl, triton_available

__all__ = ["statsq_scale", "statsq_fake_quant", "statsq_fake_quant_reference", "lsq_fake_quant",
           "lsq_fake_quant_reference", "lsq_range"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lsq_range(bits: int, signed: bool) -> Tuple[int, int]:
    """``(Qn, Qp)`` of a ``bits``-bit LSQ quantizer."""
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (float32/float64 kept)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def statsq_scale(w: torch.Tensor) -> torch.Tensor:
    """StatsQ's per-output-channel scale ``2 * mean(|w|)`` (>= fp32, shape ``(C_out, 1, ...)``, detached)."""
    return (2 * _acc(w.detach()).abs().flatten(1).mean(1)).view(-1, *([1] * (w.ndim - 1)))


def _statsq_levels(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    n = float(2 ** (bits - 1))
    return torch.round(torch.clamp(_acc(w) / scale, -1.0, 1.0 - 1e-6) * n - 0.5)


class _StatsQSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, wq):
        return wq

    @staticmethod
    def backward(ctx, g):
        return g, None


def statsq_fake_quant_reference(w: torch.Tensor, bits: int) -> torch.Tensor:
    """StatsQ (see module doc): per-output-channel scale ``2*mean|w|``, 2**bits half-integer levels, identity STE."""
    scale = statsq_scale(w)
    n = float(2 ** (bits - 1))
    wq = (scale * ((_statsq_levels(w, scale, bits) + 0.5) / n)).to(w.dtype)
    return wq + (w - w.detach())  # value of wq, gradient of w (identity STE)


def _lsq_view(x: torch.Tensor, dim: Optional[int]) -> Tuple[int, int, int]:
    if dim is None:
        return 1, 1, x.numel()
    dim = dim % x.ndim
    outer = 1
    for s in x.shape[:dim]:
        outer *= s
    return outer, x.shape[dim], x[(0,) * (dim + 1)].numel() if x.numel() else 0


def _step_shape(x: torch.Tensor, dim: Optional[int]):
    if dim is None:
        return (1,) * x.ndim
    dim = dim % x.ndim
    return tuple(x.shape[dim] if i == dim else 1 for i in range(x.ndim))


def lsq_fake_quant_reference(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool,
                             dim: Optional[int] = None, grad_scale: float = 1.0) -> torch.Tensor:
    """LSQ (see module doc), written with the official straight-through helpers."""
    qn, qp = lsq_range(bits, signed)
    s = step.to(_acc(x).dtype).reshape(_step_shape(x, dim))
    s_scaled = s * grad_scale
    s = torch.clamp_min(s.detach(), 1e-5) + (s_scaled - s_scaled.detach())  # value clipped, gradient scaled
    v = _acc(x) / s
    v = torch.where((v > qn) & (v < qp), v, v.detach().clamp(qn, qp))      # clamp; no gradient where clamped
    v = torch.round(v) + (v - v.detach())                                  # round, straight-through gradient
    return (v * s).to(x.dtype)


def statsq_fake_quant(w: torch.Tensor, bits: int, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher for StatsQ: the Triton kernel on CUDA (fp16/bf16/fp32), else the reference."""
    if resolve_impl(impl, w, w.dtype in _KERNEL_DTYPES and w.ndim >= 2) == "reference":
        return statsq_fake_quant_reference(w, bits)
    scale = statsq_scale(w)
    return _StatsQSTE.apply(w, torch.ops.metamixer.statsq_fake_quant(w.detach().contiguous(), scale.flatten(), bits))


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, dim: Optional[int] = None,
                   grad_scale: float = 1.0, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher for LSQ: the Triton kernels on CUDA (fp16/bf16/fp32), else the reference."""
    if step.numel() != (1 if dim is None else x.shape[dim]):
        raise ValueError(f"step has {step.numel()} entries but x has {1 if dim is None else x.shape[dim]} "
                         f"along dim {dim}")
    lsq_range(bits, signed)
    if resolve_impl(impl, x, x.dtype in _KERNEL_DTYPES) == "reference":
        return lsq_fake_quant_reference(x, step, bits, signed, dim, grad_scale)
    outer, c, inner = _lsq_view(x, dim)
    y = torch.ops.metamixer.lsq_fake_quant(x.contiguous(), step.float().contiguous(), bits, signed, c, inner,
                                           float(grad_scale))
    return y.view(x.shape)


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _statsq_fwd_kernel(W, S, Y, K, N_LEVELS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < K
        base = row.to(tl.int64) * K
        w = tl.load(W + base + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + row)
        c = tl.minimum(tl.maximum(tl.math.div_rn(w, s), -1.0), 1.0 - 1e-6)
        k = _round_half_even(c * N_LEVELS - 0.5)
        y = s * tl.math.div_rn(k + 0.5, N_LEVELS * 1.0)
        tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _lsq_kernel(X, S, G, Y, GX, GS, R, C, INNER, QN: tl.constexpr, QP: tl.constexpr, BACKWARD: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # tile: BLOCK_R positions (outer, inner) x BLOCK_C channels of the (outer, C, inner) view
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        mask = (r < R)[:, None] & cmask[None, :]
        o = (r // INNER).to(tl.int64)
        i = (r % INNER).to(tl.int64)
        offs = (o * C * INNER + i)[:, None] + (c.to(tl.int64) * INNER)[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.maximum(tl.load(S + c, mask=cmask, other=1.0), 1e-5)[None, :]
        v = tl.math.div_rn(x, s)
        vc = tl.minimum(tl.maximum(v, QN * 1.0), QP * 1.0)
        q = _round_half_even(vc)
        if BACKWARD:
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
            inside = (v > QN) & (v < QP)
            tl.store(GX + offs, tl.where(inside, g, 0.0).to(GX.dtype.element_ty), mask=mask)
            part = tl.sum(g * tl.where(inside, q - v, vc), axis=0)
            tl.atomic_add(GS + c, part, mask=cmask)
        else:
            tl.store(Y + offs, (q * s).to(Y.dtype.element_ty), mask=mask)

    def _lsq_blocks(c: int, inner: int) -> Tuple[int, int]:
        if inner == 1:  # channels contiguous: vectorise over channels
            bc = min(64, triton.next_power_of_2(c))
            return max(1, 2048 // bc), bc
        return 256, min(4, triton.next_power_of_2(c))

    def _lsq_launch(x, step, g, bits, signed, c, inner, backward):
        qn, qp = lsq_range(bits, signed)
        rows = x.numel() // c if c else 0
        br, bc = _lsq_blocks(c, inner)
        grid = (triton.cdiv(rows, br), triton.cdiv(c, bc))
        if backward:
            gx = torch.empty_like(x)
            gs = torch.zeros(c, device=x.device, dtype=torch.float32)
            if x.numel():
                _lsq_kernel[grid](x, step, g, x, gx, gs, rows, c, inner, QN=qn, QP=qp, BACKWARD=True,
                                  BLOCK_R=br, BLOCK_C=bc)
            return gx, gs
        y = torch.empty_like(x)
        if x.numel():
            _lsq_kernel[grid](x, step, x, y, x, step, rows, c, inner, QN=qn, QP=qp, BACKWARD=False,
                              BLOCK_R=br, BLOCK_C=bc)
        return y

    @torch.library.custom_op("metamixer::statsq_fake_quant", mutates_args=())
    def _statsq_op(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        y = torch.empty_like(w)
        k = w[0].numel()
        block = min(1024, triton.next_power_of_2(max(k, 1)))
        if w.numel():
            _statsq_fwd_kernel[(w.shape[0], triton.cdiv(k, block))](w, scale, y, k, N_LEVELS=2 ** (bits - 1),
                                                                     BLOCK=block)
        return y

    @_statsq_op.register_fake
    def _(w, scale, bits):
        return torch.empty_like(w)

    @torch.library.custom_op("metamixer::lsq_fake_quant", mutates_args=())
    def _lsq_op(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, c: int, inner: int,
                grad_scale: float) -> torch.Tensor:
        return _lsq_launch(x, step, None, bits, signed, c, inner, False)

    @_lsq_op.register_fake
    def _(x, step, bits, signed, c, inner, grad_scale):
        return torch.empty_like(x)

    @torch.library.custom_op("metamixer::lsq_fake_quant_backward", mutates_args=())
    def _lsq_bwd_op(g: torch.Tensor, x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, c: int,
                    inner: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return _lsq_launch(x, step, g.contiguous(), bits, signed, c, inner, True)

    @_lsq_bwd_op.register_fake
    def _(g, x, step, bits, signed, c, inner):
        return torch.empty_like(x), step.new_empty(c, dtype=torch.float32)

    def _lsq_setup(ctx, inputs, output):
        x, step, bits, signed, c, inner, grad_scale = inputs
        ctx.save_for_backward(x, step)
        ctx.args = (bits, signed, c, inner, grad_scale)

    def _lsq_backward(ctx, g):
        x, step = ctx.saved_tensors
        bits, signed, c, inner, grad_scale = ctx.args
        gx, gs = _lsq_bwd_op(g, x, step, bits, signed, c, inner)
        return gx, (gs * grad_scale).to(step.dtype), None, None, None, None, None

    _lsq_op.register_autograd(_lsq_backward, setup_context=_lsq_setup)
