"""Depthwise 2-D convolution: the large-kernel token mixer of FFNet, VAN, OverLoCK and MS-MLP.

Definition (``dwconv2d_reference``): ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` with
``weight`` of shape ``(C, 1, kh, kw)``: every channel is convolved with its own kernel.

Triton path (``impl='triton'``, or ``auto`` on CUDA; float64 always takes the reference): stride 1, square odd kernel (any size), any dilation, 'same'
zero padding ``dilation * (k - 1) // 2``, optional bias; NCHW or channels-last (any strides: the output keeps the
input's memory format); fp32/fp16/bf16 with fp32 accumulation. Other arguments (strided convs, channel
multipliers) use the reference. The kernels:
  * forward: one program computes a tile of (pixels x channels) of one image, looping over the k*k taps
    (masked loads give the zero padding);
  * input gradient: the same kernel on the flipped weights (for 'same' padding the transposed conv is a conv);
  * weight gradient: each program reduces its tile's products for every tap and adds them into an fp32
    buffer with atomics; bias gradient: a sum over the output gradient.
The Triton path is a ``torch.library.custom_op`` (``metamixer::dwconv2d``) with its backward registered, so it
works under ``torch.compile`` (as an opaque op) and autocast (inputs are cast like ``F.conv2d`` would).
``DWConv2d`` is an ``nn.Conv2d`` drop-in (same parameters and state_dict keys) whose forward calls the dispatcher.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._dispatch import resolve_impl, triton_available

__all__ = ["dwconv2d", "dwconv2d_reference", "DWConv2d"]

_Pair = Union[int, Tuple[int, int]]


def _pair(v: _Pair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def dwconv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1) -> torch.Tensor:
    """Depthwise conv: ``weight`` is ``(C, 1, kh, kw)``, each channel convolved with its own kernel."""
    if weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"depthwise weight must be (C, 1, kh, kw) with C={x.shape[1]}, got {tuple(weight.shape)}")
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])


def _triton_supported(x: torch.Tensor, weight: torch.Tensor, stride: _Pair, padding: _Pair, dilation: _Pair) -> bool:
    k, kw = weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return (x.ndim == 4 and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and weight.shape[0] == x.shape[1] and weight.shape[1] == 1 and k == kw and k % 2 == 1
            and sh == sw == 1 and dh == dw and ph == pw == dh * (k - 1) // 2)


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: the Triton kernels on CUDA for stride-1 'same' convs (see module doc), else the reference."""
    if resolve_impl(impl, x, _triton_supported(x, weight, stride, padding, dilation)) == "reference":
        return dwconv2d_reference(x, weight, bias, stride, padding, dilation)
    if torch.is_autocast_enabled(x.device.type):  # match F.conv2d's autocast behaviour
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    elif weight.dtype != x.dtype:
        raise TypeError(f"dwconv2d: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    with torch.autocast(x.device.type, enabled=False):
        return torch.ops.metamixer.dwconv2d(x, weight.contiguous(), bias, _pair(dilation)[0])


class DWConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, out_dim, k, groups=dim)`` whose forward calls :func:`dwconv2d` (keys ``weight``/``bias``)."""

    def __init__(self, dim: int, kernel_size: int, stride: int = 1, padding: Optional[int] = None,
                 dilation: int = 1, bias: bool = True, out_dim: Optional[int] = None):
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        super().__init__(dim, out_dim or dim, kernel_size, stride, padding, dilation, groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_channels != self.in_channels:  # channel-multiplier depthwise: not the op's contract
            return super().forward(x)
        return dwconv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _dwconv_fwd_kernel(X, Wt, Bias, Y, C, H, W, sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                           K: tl.constexpr, DIL: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_s, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tiles_w = tl.cdiv(W, BLOCK_W)
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        oh = (pid_s // tiles_w) * BLOCK_H + p // BLOCK_W
        ow = (pid_s % tiles_w) * BLOCK_W + p % BLOCK_W
        oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = oc < C
        PAD: tl.constexpr = DIL * (K - 1) // 2
        x_ptr = X + pid_b.to(tl.int64) * sxb + oc[None, :] * sxc
        acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
        for i in range(K):
            ih = oh + (i * DIL - PAD)
            hmask = (ih >= 0) & (ih < H)
            for j in range(K):
                iw = ow + (j * DIL - PAD)
                m = (hmask & (iw >= 0) & (iw < W))[:, None] & cmask[None, :]
                xv = tl.load(x_ptr + (ih * sxh + iw * sxw)[:, None], mask=m, other=0.0)
                wv = tl.load(Wt + oc * (K * K) + (i * K + j), mask=cmask, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + oc, mask=cmask, other=0.0).to(tl.float32)[None, :]
        omask = ((oh < H) & (ow < W))[:, None] & cmask[None, :]
        y_ptr = Y + pid_b.to(tl.int64) * syb + oc[None, :] * syc + (oh * syh + ow * syw)[:, None]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=omask)

    @triton.jit
    def _dwconv_bwd_w_kernel(X, GY, GW, C, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
                             K: tl.constexpr, DIL: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_s, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tiles_w = tl.cdiv(W, BLOCK_W)
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        oh = (pid_s // tiles_w) * BLOCK_H + p // BLOCK_W
        ow = (pid_s % tiles_w) * BLOCK_W + p % BLOCK_W
        oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = oc < C
        PAD: tl.constexpr = DIL * (K - 1) // 2
        omask = ((oh < H) & (ow < W))[:, None] & cmask[None, :]
        g_ptr = GY + pid_b.to(tl.int64) * sgb + oc[None, :] * sgc + (oh * sgh + ow * sgw)[:, None]
        gy = tl.load(g_ptr, mask=omask, other=0.0).to(tl.float32)
        x_ptr = X + pid_b.to(tl.int64) * sxb + oc[None, :] * sxc
        for i in range(K):
            ih = oh + (i * DIL - PAD)
            hmask = (ih >= 0) & (ih < H)
            for j in range(K):
                iw = ow + (j * DIL - PAD)
                m = (hmask & (iw >= 0) & (iw < W))[:, None] & omask
                xv = tl.load(x_ptr + (ih * sxh + iw * sxw)[:, None], mask=m, other=0.0)
                part = tl.sum(xv.to(tl.float32) * gy, axis=0)
                tl.atomic_add(GW + oc * (K * K) + (i * K + j), part, mask=cmask)

    def _blocks(x: torch.Tensor, k: int) -> Tuple[int, int, int]:
        C, H, W = x.shape[1:]
        if x.stride(1) == 1:  # channels-last: vectorise over channels
            bc = min(64, triton.next_power_of_2(C))
            bw = min(8, triton.next_power_of_2(W))
            bh = max(1, min(2048 // (bc * bw), triton.next_power_of_2(H)))
        else:  # NCHW: vectorise along W
            bc = min(4, triton.next_power_of_2(C))
            bw = min(32, triton.next_power_of_2(W))
            bh = max(1, min(1024 // (bc * bw), triton.next_power_of_2(H)))
        return bh, bw, bc

    def _launch_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], dil: int) -> torch.Tensor:
        B, C, H, W = x.shape
        k = w.shape[-1]
        y = torch.empty_like(x)
        bh, bw, bc = _blocks(x, k)
        grid = (triton.cdiv(H, bh) * triton.cdiv(W, bw), triton.cdiv(C, bc), B)
        _dwconv_fwd_kernel[grid](x, w, b if b is not None else w, y, C, H, W, *x.stride(), *y.stride(),
                                 K=k, DIL=dil, HAS_BIAS=b is not None, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc)
        return y

    @torch.library.custom_op("metamixer::dwconv2d", mutates_args=())
    def _dwconv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int) -> torch.Tensor:
        return _launch_fwd(x, weight, bias, dilation)

    @_dwconv2d_op.register_fake
    def _(x, weight, bias, dilation):
        return torch.empty_like(x)

    @torch.library.custom_op("metamixer::dwconv2d_backward", mutates_args=())
    def _dwconv2d_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int,
                         need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        B, C, H, W = x.shape
        k = weight.shape[-1]
        gx = _launch_fwd(grad, weight.flip(-1, -2).contiguous(), None, dilation) if need_x else x.new_empty(0)
        gw = weight.new_empty(0)
        if need_w:
            acc = torch.zeros(C, 1, k, k, device=x.device, dtype=torch.float32)
            bh, bw, bc = _blocks(x, k)
            grid = (triton.cdiv(H, bh) * triton.cdiv(W, bw), triton.cdiv(C, bc), B)
            _dwconv_bwd_w_kernel[grid](x, grad, acc, C, H, W, *x.stride(), *grad.stride(),
                                       K=k, DIL=dilation, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc)
            gw = acc.to(weight.dtype)
        return gx, gw

    @_dwconv2d_bwd_op.register_fake
    def _(grad, x, weight, dilation, need_x, need_w):
        return (torch.empty_like(x) if need_x else x.new_empty(0),
                torch.empty_like(weight) if need_w else weight.new_empty(0))

    def _setup_context(ctx, inputs, output):
        x, weight, bias, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        ctx.has_bias = bias is not None

    def _backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        gx, gw = _dwconv2d_bwd_op(grad, x, weight, ctx.dilation, need_x, need_w)
        gb = grad.sum((0, 2, 3), dtype=torch.float32).to(grad.dtype) if need_b else None
        return (gx if need_x else None), (gw if need_w else None), gb, None

    _dwconv2d_op.register_autograd(_backward, setup_context=_setup_context)
