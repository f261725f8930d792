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
  * weight gradient: tap-stationary; each program keeps all k*k taps x BLOCK_C channels in fp32 registers and
    walks a run of output pixels (across images), adding ``patch(x) * grad``; one partial sum per run, summed
    afterwards (deterministic, no atomics); bias gradient: a sum over the output gradient.
On the GPU the forward tile shape is autotuned per (C, H, W, k, dilation, layout).
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

    from ._dispatch import interpreting

    @triton.jit
    def _dwconv_fwd_kernel(X, Wt, Bias, Y, C, H, W, sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                           K: tl.constexpr, DIL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_C: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program: a BLOCK_H x BLOCK_W pixel tile of one image, BLOCK_C channels, all K*K taps."""
        pid_s, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tiles_w = tl.cdiv(W, BLOCK_W)
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        oh = (pid_s // tiles_w) * BLOCK_H + p // BLOCK_W
        ow = (pid_s % tiles_w) * BLOCK_W + p % BLOCK_W
        oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = (oc < C) if not EVEN_C else (oc >= 0)
        PAD: tl.constexpr = DIL * (K - 1) // 2
        # pointers of the tap at offset (-PAD, -PAD); each tap adds a scalar offset
        x_ptr = (X + pid_b.to(tl.int64) * sxb + oc[None, :] * sxc
                 + ((oh - PAD) * sxh + (ow - PAD) * sxw)[:, None])
        w_ptr = Wt + oc * (K * K)
        acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
        for i in range(K):
            ih = oh + (i * DIL - PAD)
            hmask = (ih >= 0) & (ih < H)
            for j in tl.static_range(K):
                iw = ow + (j * DIL - PAD)
                m = (hmask & (iw >= 0) & (iw < W))[:, None] & cmask[None, :]
                xv = tl.load(x_ptr + (i * DIL * sxh + j * DIL * sxw), mask=m, other=0.0)
                wv = tl.load(w_ptr + (i * K + j), mask=cmask, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + oc, mask=cmask, other=0.0).to(tl.float32)[None, :]
        omask = ((oh < H) & (ow < W))[:, None] & cmask[None, :]
        y_ptr = Y + pid_b.to(tl.int64) * syb + oc[None, :] * syc + (oh * syh + ow * syw)[:, None]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=omask)

    @triton.jit
    def _dwconv_bwd_w_kernel(X, GY, GW, B, C, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, PIX_PER_PROG,
                             K: tl.constexpr, KKP: tl.constexpr, DIL: tl.constexpr, BLOCK_C: tl.constexpr,
                             UNROLL: tl.constexpr):
        """Weight gradient, tap-stationary: the program keeps a (K*K, BLOCK_C) fp32 accumulator and walks a run of
        output pixels; per pixel it loads the grad vector once and the K x K input patch around it, so the sum over
        pixels never crosses threads. Each run writes its partial sums to GW[run] (no atomics: deterministic)."""
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = oc < C
        PAD: tl.constexpr = DIL * (K - 1) // 2
        t = tl.arange(0, KKP)
        tmask = t < K * K
        di = (t // K) * DIL - PAD
        dj = (t % K) * DIL - PAD
        patch = (di * sxh + dj * sxw)[:, None] + oc[None, :] * sxc
        acc = tl.zeros((KKP, BLOCK_C), dtype=tl.float32)
        HW = H * W
        start = pid_r * PIX_PER_PROG
        end = tl.minimum(start + PIX_PER_PROG, B * HW)
        for n0 in range(start, end, UNROLL):  # UNROLL independent pixels per step keep several loads in flight
            for u in tl.static_range(UNROLL):
                n = n0 + u
                b = n // HW
                h = (n % HW) // W
                w = n % W
                g = tl.load(GY + b.to(tl.int64) * sgb + h * sgh + w * sgw + oc * sgc, mask=cmask & (oc * 0 + n < end),
                            other=0.0)
                hh = h + di
                ww = w + dj
                m = tmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W) & (t * 0 + n < end)
                xv = tl.load(X + b.to(tl.int64) * sxb + h * sxh + w * sxw + patch,
                             mask=m[:, None] & cmask[None, :], other=0.0)
                acc += xv.to(tl.float32) * g.to(tl.float32)[None, :]
        out = GW + pid_r.to(tl.int64) * (K * K * C) + t[:, None] * C + oc[None, :]
        tl.store(out, acc, mask=tmask[:, None] & cmask[None, :])

    def _fwd_configs():
        cfgs = []
        # channels-last tiles first (the fastest in benchmarks/tune_dwconv.py on an H100), then NCHW tiles
        for bc, bh, bw, nw in [(64, 4, 8, 4), (64, 8, 8, 4), (64, 2, 8, 2), (64, 4, 4, 2), (32, 4, 8, 2),
                               (16, 8, 16, 4), (4, 8, 32, 4), (8, 4, 32, 4), (2, 8, 64, 4), (1, 16, 64, 4)]:
            cfgs.append(triton.Config(dict(BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw), num_warps=nw))
        return cfgs

    def _prune(configs, named_args, **kw):
        """Keep channel-vectorised tiles for channels-last inputs and W-vectorised ones for NCHW."""
        cl = named_args["sxc"] == 1
        keep = [c for c in configs if (c.kwargs["BLOCK_C"] >= 16) == cl]
        return keep or configs

    if not interpreting():  # autotune on the GPU; the interpreter runs the first config only
        _dwconv_fwd_kernel = triton.autotune(
            configs=_fwd_configs(), key=["C", "H", "W", "K", "DIL", "sxc"],
            prune_configs_by={"early_config_prune": _prune})(_dwconv_fwd_kernel)

    def _blocks(x: torch.Tensor) -> Tuple[int, int, int]:
        """Tile for the interpreter and the weight-gradient kernel: channels-last vectorises over C, NCHW over W."""
        C, H, W = x.shape[1:]
        if x.stride(1) == 1:
            bc = min(64, triton.next_power_of_2(C))
            bw = min(8, triton.next_power_of_2(W))
            bh = max(1, min(2048 // (bc * bw), triton.next_power_of_2(H)))
        else:
            bc = min(4, triton.next_power_of_2(C))
            bw = min(32, triton.next_power_of_2(W))
            bh = max(1, min(1024 // (bc * bw), triton.next_power_of_2(H)))
        return bh, bw, bc

    def _launch_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], dil: int) -> torch.Tensor:
        B, C, H, W = x.shape
        k = w.shape[-1]
        y = torch.empty_like(x)
        args = (x, w, b if b is not None else w, y, C, H, W, *x.stride(), *y.stride())
        meta = dict(K=k, DIL=dil, HAS_BIAS=b is not None)
        if interpreting():
            bh, bw, bc = _blocks(x)
            grid = (triton.cdiv(H, bh) * triton.cdiv(W, bw), triton.cdiv(C, bc), B)
            _dwconv_fwd_kernel[grid](*args, **meta, EVEN_C=C % bc == 0, BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc)
        else:
            def grid(m):
                return (triton.cdiv(H, m["BLOCK_H"]) * triton.cdiv(W, m["BLOCK_W"]), triton.cdiv(C, m["BLOCK_C"]), B)
            _dwconv_fwd_kernel[grid](*args, **meta, EVEN_C=False)
        return y

    def _bwd_w_blocks(C: int, k: int) -> Tuple[int, int, int]:
        kkp = triton.next_power_of_2(k * k)
        bc = max(16, min(64, 8192 // kkp, triton.next_power_of_2(C)))
        return kkp, bc, 8 if kkp * bc > 4096 else 4

    def _launch_bwd_w(x: torch.Tensor, grad: torch.Tensor, k: int, dil: int) -> torch.Tensor:
        B, C, H, W = x.shape
        kkp, bc, nw = _bwd_w_blocks(C, k)
        c_blocks = triton.cdiv(C, bc)
        # many short runs of pixels: the loop is latency-bound, so occupancy hides the load latency
        target = 32 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1)
        npix = B * H * W
        per = triton.cdiv(npix, max(1, min(npix, target // c_blocks)))
        runs = triton.cdiv(npix, per)
        part = torch.empty(runs, k * k, C, device=x.device, dtype=torch.float32)
        _dwconv_bwd_w_kernel[(runs, c_blocks)](x, grad, part, B, C, H, W, *x.stride(), *grad.stride(), per,
                                               K=k, KKP=kkp, DIL=dil, BLOCK_C=bc, UNROLL=4, num_warps=nw)
        return part.sum(0).t().reshape(C, 1, k, k)

    @torch.library.custom_op("metamixer::dwconv2d", mutates_args=())
    def _dwconv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int) -> torch.Tensor:
        return _launch_fwd(x, weight, bias, dilation)

    @_dwconv2d_op.register_fake
    def _(x, weight, bias, dilation):
        return torch.empty_like(x)

    @torch.library.custom_op("metamixer::dwconv2d_backward", mutates_args=())
    def _dwconv2d_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int,
                         need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        k = weight.shape[-1]
        if grad.stride() != x.stride():  # same memory format for both kernels' tiles
            grad = grad.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
        gx = _launch_fwd(grad, weight.flip(-1, -2).contiguous(), None, dilation) if need_x else x.new_empty(0)
        gw = _launch_bwd_w(x, grad, k, dilation).to(weight.dtype) if need_w else weight.new_empty(0)
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
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        gx, gw = _dwconv2d_bwd_op(grad, x, weight, ctx.dilation, need_x, need_w)
        gb = grad.sum((0, 2, 3), dtype=torch.float32).to(grad.dtype) if need_b else None
        return (gx if need_x else None), (gw if need_w else None), gb, None

    _dwconv2d_op.register_autograd(_backward, setup_context=_setup_context)
