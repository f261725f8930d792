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

Triton path (``impl='triton'``, or ``auto`` on CUDA; float64 always takes the reference): both depthwise convs run
through ``ops.dwconv.dwconv2d(..., impl='triton')``; the 1x1 conv and the gate are one Triton GEMM whose epilogue
multiplies by ``x`` (``out = x * (a @ w1^T + b1)``, so ``attn`` is never written); its backward recomputes ``attn``
in the same GEMM and writes ``grad * attn`` (the gate's input gradient) and ``grad * x`` (the 1x1 conv's output
gradient) in one pass, the 1x1 conv's own gradients are plain matmuls. Eager calls of the gate go through a
``torch.autograd.Function``; under ``torch.compile`` it is the custom op ``metamixer::lka_gate`` with its backward
registered (opaque, no graph break). Under autocast the convs run in the autocast dtype and the output has
``x * attn``'s promoted dtype, as in the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import interpreting, resolve_impl, triton_available
from .dwconv import dwconv2d, dwconv2d_reference

__all__ = ["lka", "lka_reference"]


def _check_shapes(x: torch.Tensor, w5: torch.Tensor, w7: torch.Tensor, w1: torch.Tensor) -> None:
    c = x.shape[1]
    for name, w, shape in (("w5", w5, (c, 1, 5, 5)), ("w7", w7, (c, 1, 7, 7)), ("w1", w1, (c, c, 1, 1))):
        if tuple(w.shape) != shape:
            raise ValueError(f"lka: {name} must have shape {shape} for an input with C={c}, got {tuple(w.shape)}")


def lka_reference(x: torch.Tensor, w5: torch.Tensor, b5: Optional[torch.Tensor], w7: torch.Tensor,
                  b7: Optional[torch.Tensor], w1: torch.Tensor, b1: Optional[torch.Tensor]) -> torch.Tensor:
    """LKA in plain PyTorch: the definition of the op (any device and dtype)."""
    _check_shapes(x, w5, w7, w1)
    attn = dwconv2d_reference(x, w5, b5, padding=2)
    attn = dwconv2d_reference(attn, w7, b7, padding=9, dilation=3)
    attn = F.conv2d(attn, w1, b1)
    return x * attn


def lka(x: torch.Tensor, w5: torch.Tensor, b5: Optional[torch.Tensor], w7: torch.Tensor, b7: Optional[torch.Tensor],
        w1: torch.Tensor, b1: Optional[torch.Tensor], impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher the models call: Triton on CUDA where available (see ``ops._dispatch``), else the reference."""
    supported = x.ndim == 4 and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    # auto on CUDA: the reference's structure with each depthwise conv through the dwconv2d dispatcher (Triton for
    # the dilated 7x7 and for the 5x5 on maps up to 28 wide, cuDNN for the 5x5 at 56x56). The fused gate GEMM path
    # (impl='triton') is at best 1.0-1.16x faster in GPU time at van_b0's shapes on an H100 and has measured slower
    # there: not enough to make it the default without a model-level measurement.
    if resolve_impl(impl, x, supported, preferred=False) == "reference":
        if resolve_impl(impl, x, supported) == "triton":  # auto on a CUDA tensor
            _check_shapes(x, w5, w7, w1)
            attn = dwconv2d(x, w5, b5, padding=2)
            attn = dwconv2d(attn, w7, b7, padding=9, dilation=3)
            return x * F.conv2d(attn, w1, b1)
        return lka_reference(x, w5, b5, w7, b7, w1, b1)
    _check_shapes(x, w5, w7, w1)
    attn = dwconv2d(x, w5, b5, padding=2, impl="triton")  # casts like F.conv2d under autocast
    attn = dwconv2d(attn, w7, b7, padding=9, dilation=3, impl="triton")
    if w1.dtype != attn.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"lka: input dtype {attn.dtype} and w1 dtype {w1.dtype} differ")
    w1 = w1.to(attn.dtype).reshape(w1.shape[0], w1.shape[1]).contiguous()
    b1 = b1.to(attn.dtype) if b1 is not None else None
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():  # an opaque custom op with a registered backward for torch.compile
            return torch.ops.metamixer.lka_gate(x, attn, w1, b1)
        return _LKAGateFn.apply(x, attn, w1, b1)  # eager: far less per-call overhead than the custom op


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gate_gemm_kernel(A, Wt, Bias, X, G, O1, O2, M, HW, C, sab, sac, sap, sxb, sxc, sxp, sgb, sgc, sgp,
                          s1b, s1c, s1p, s2b, s2c, s2p, BWD: tl.constexpr, HAS_BIAS: tl.constexpr,
                          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """attn[m, n] = sum_k A[m, k] * Wt[n, k] + Bias[n] over pixels m (= b * HW + p) and channels n, then
        forward: O1 = X * attn; backward (G = grad of the output): O1 = G * attn, O2 = G * X."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = rm < M
        bi = (rm // HW).to(tl.int64)
        pi = rm % HW
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < C
        a_row = A + bi * sab + pi * sap
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < C
            a = tl.load(a_row[:, None] + rk[None, :] * sac, mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(Wt + rn[None, :] * C + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            if IEEE:  # fp32 operands: true fp32 products (no TF32); also the interpreter's path, see _launch_gate
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        mask = mmask[:, None] & nmask[None, :]
        xv = tl.load(X + (bi * sxb + pi * sxp)[:, None] + rn[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        o1 = O1 + (bi * s1b + pi * s1p)[:, None] + rn[None, :] * s1c
        if BWD:
            gv = tl.load(G + (bi * sgb + pi * sgp)[:, None] + rn[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
            tl.store(o1, (gv * acc).to(O1.dtype.element_ty), mask=mask)
            o2 = O2 + (bi * s2b + pi * s2p)[:, None] + rn[None, :] * s2c
            tl.store(o2, (gv * xv).to(O2.dtype.element_ty), mask=mask)
        else:
            tl.store(o1, (xv * acc).to(O1.dtype.element_ty), mask=mask)

    def _pixels(t: torch.Tensor) -> torch.Tensor:
        """``t`` with pixel index p = h * W + w at a single stride (NCHW-contiguous or channels-last style)."""
        return t if t.stride(2) == t.shape[3] * t.stride(3) else t.contiguous()

    def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
        return t.stride(0), t.stride(1), t.stride(3)

    def _launch_gate(x, a, w, b, g, out1, out2, bwd: bool) -> None:
        B, C, H, W = x.shape
        M = B * H * W
        bn = min(256, max(16, triton.next_power_of_2(C)))
        bk = min(64, max(16, triton.next_power_of_2(C)))
        bm = 128 if bn <= 64 else 64
        grid = (triton.cdiv(M, bm), triton.cdiv(C, bn))
        _gate_gemm_kernel[grid](a, w, b if b is not None else w, x, g, out1, out2, M, H * W, C,
                                *_strides(a), *_strides(x), *_strides(g), *_strides(out1), *_strides(out2),
                                BWD=bwd, HAS_BIAS=b is not None,
                                # Triton's interpreter (CPU tests) evaluates a bf16 tl.dot wrongly: upcast there
                                IEEE=a.dtype == torch.float32 or interpreting(),
                                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4 if bn <= 64 else 8)

    def _gate_fwd(x, a, w, b):
        x, a = _pixels(x), _pixels(a)
        out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, a.dtype))
        _launch_gate(x, a, w, b, x, out, out, bwd=False)
        return out

    def _gate_bwd(grad, x, a, w, b):
        grad, x, a = _pixels(grad), _pixels(x), _pixels(a)
        gx, gattn = torch.empty_like(x), torch.empty_like(a)
        _launch_gate(x, a, w, b, grad, gx, gattn, bwd=True)
        return gx, gattn

    @torch.library.custom_op("metamixer::lka_gate", mutates_args=())
    def _lka_gate_op(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        return _gate_fwd(x, a, w, b)

    @_lka_gate_op.register_fake
    def _(x, a, w, b):
        return torch.empty_like(x, dtype=torch.promote_types(x.dtype, a.dtype))

    @torch.library.custom_op("metamixer::lka_gate_backward", mutates_args=())
    def _lka_gate_bwd_op(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                         b: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return _gate_bwd(grad, x, a, w, b)

    @_lka_gate_bwd_op.register_fake
    def _(grad, x, a, w, b):
        return torch.empty_like(x), torch.empty_like(a)

    def _setup_context(ctx, inputs, output):
        x, a, w, b = inputs
        ctx.save_for_backward(x, a, w, b)

    def _rows(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # (pixels, C): a view for channels-last

    def _backward(ctx, grad, bwd_fn=_lka_gate_bwd_op):
        x, a, w, b = ctx.saved_tensors
        gx, gattn = bwd_fn(grad, x, a, w, b)
        B, C, H, W = a.shape
        g2 = _rows(gattn)
        ga = (g2 @ w).view(B, H, W, C).permute(0, 3, 1, 2) if ctx.needs_input_grad[1] else None
        gw = (g2.t() @ _rows(a)) if ctx.needs_input_grad[2] else None
        gb = g2.sum(0, dtype=torch.float32).to(b.dtype) if b is not None and ctx.needs_input_grad[3] else None
        return gx, ga, gw, gb

    _lka_gate_op.register_autograd(_backward, setup_context=_setup_context)

    class _LKAGateFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a, w, b):
            ctx.save_for_backward(x, a, w, b)
            return _gate_fwd(x, a, w, b)

        @staticmethod
        def backward(ctx, grad):
            return _backward(ctx, grad, _gate_bwd)
