"""Depthwise 2-D convolution: the large-kernel token mixer of FFNet, VAN, OverLoCK and MS-MLP.

Definition (``dwconv2d_reference``): ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` with
``weight`` of shape ``(C, 1, kh, kw)``: every channel is convolved with its own kernel.

Triton path (``impl='triton'``; ``auto`` on CUDA takes it for dilated or >= 9x9 kernels, for strided or channel-
multiplier convs on channels-last inputs and for the whole-row kernels' narrow maps, where it measured faster than
cuDNN; float64 always takes the reference): square odd kernel (any size), any dilation, 'same' zero padding
``dilation * (k - 1) // 2``, any stride, channel multiplier m (weight ``(m*C, 1, k, k)``), optional bias; NCHW or
channels-last (the output keeps the input's memory format); fp32/fp16/bf16 with fp32 accumulation. Other arguments
use the reference. The kernels:
  * forward, whole-row (channels-last, C a multiple of 8, k >= 5, maps up to 28 wide or 56 with dilation): a
    program owns one output row of a block of images, the width is a compile-time constant, so each loaded input
    feeds exactly the outputs it reaches and a dilated kernel's taps outside the map cost nothing (``_row_source``);
  * forward, row-segment (channels-last, C a multiple of 8, 5x5..9x9, wider maps): each thread owns 7 output pixels
    of a row and 4 channels and reuses every loaded input for up to k taps from registers (``_seg_source``);
  * forward, tap loop (everything else): a tile of (pixels x channels) of one image, looping over the k*k taps
    (masked loads give the zero padding);
  * input gradient: the forward kernel on the rotated weights (for 'same' padding the transposed conv is a conv);
  * weight gradient: whole-row or row-segment where the forward is (one kernel row per program, ``_roww_source``,
    ``_segw_source``), else tap-stationary (all k*k taps x BLOCK_C channels in fp32 registers, walking a run of
    output pixels); one partial sum per run, summed afterwards (deterministic, no atomics); the bias gradient is
    summed by the same kernels;
  * stride s / multiplier m: channels repeated m times, the stride-1 conv, every s-th pixel (``_strided_or_multiplied``).
Eager calls go through a ``torch.autograd.Function`` (measured ~5 us per call on an H100 vs ~59 us for a
``torch.library.custom_op``); under ``torch.compile`` the same kernels are the custom op ``metamixer::dwconv2d``
with its backward registered (an opaque op, no graph break). Autocast casts inputs like ``F.conv2d`` would.
``DWConv2d`` is an ``nn.Conv2d`` drop-in (same parameters and state_dict keys) whose forward calls the dispatcher.
"""
from __future__ import annotations

import functools
import linecache
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._dispatch import resolve_impl, triton_available, register_op

__all__ = ["dwconv2d", "dwconv2d_reference", "DWConv2d"]

_Pair = Union[int, Tuple[int, int]]


def _pair(v: _Pair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def seg_outputs(q: int, k: int, seg: int) -> range:
    """The pixels ``p`` of a ``seg``-pixel row segment that input column ``q`` (of the ``seg + k - 1`` it meets)
    feeds, through tap ``q - p``: what the generated row-segment kernels (here and in ops/mix_shift.py) unroll."""
    return range(max(0, q - k + 1), min(seg - 1, q) + 1)


def dwconv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1) -> torch.Tensor:
    """Depthwise conv: ``weight`` is ``(m*C, 1, kh, kw)``, each channel convolved with its own m kernels (m: the
    channel multiplier, usually 1)."""
    if weight.shape[1] != 1 or weight.shape[0] % x.shape[1]:
        raise ValueError(f"depthwise weight must be (m*C, 1, kh, kw) with C={x.shape[1]}, got {tuple(weight.shape)}")
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])


def _triton_supported(x: torch.Tensor, weight: torch.Tensor, stride: _Pair, padding: _Pair, dilation: _Pair) -> bool:
    k, kw = weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return (x.ndim == 4 and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and weight.shape[1] == 1
            and weight.shape[0] % x.shape[1] == 0 and k == kw and k % 2 == 1 and sh == sw and dh == dw
            and ph == pw == dh * (k - 1) // 2)


def _repeat_channels(x: torch.Tensor, m: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, m*C, H, W), each channel m times in a row (channel c feeds outputs m*c .. m*c+m-1, as
    groups=C orders them), in x's memory format."""
    if m == 1:
        return x
    B, C, H, W = x.shape
    if x.stride(1) == 1 and C > 1:
        return x.permute(0, 2, 3, 1).unsqueeze(-1).expand(B, H, W, C, m).reshape(B, H, W, C * m).permute(0, 3, 1, 2)
    return x.unsqueeze(2).expand(B, C, m, H, W).reshape(B, C * m, H, W)


def _subsample(y: torch.Tensor, stride: int) -> torch.Tensor:
    """Every s-th row and column, in y's memory format."""
    if stride == 1:
        return y
    fmt = torch.channels_last if y.stride(1) == 1 and y.shape[1] > 1 else torch.contiguous_format
    return y[:, :, ::stride, ::stride].contiguous(memory_format=fmt)


def _strided_or_multiplied(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                           padding: int, dilation: int) -> torch.Tensor:
    """A stride-s conv with channel multiplier m on the stride-1 Triton kernels: input channels repeated m times,
    the 'same' conv, every s-th row and column (with 'same' padding, output (i, j) of the strided conv is output
    (s*i, s*j) of the stride-1 one). Costs s*s times the work of a direct strided kernel, and still measured far
    faster than cuDNN's channels-last strided/multiplier depthwise convs (benchmarks/bench_dwconv.py). Eager
    autograd keeps x, not its m-fold copy, for the backward (as the reference conv does); under torch.compile the
    partitioner decides what to keep."""
    if not torch.compiler.is_compiling():
        return _StridedDWConv2dFn.apply(x, weight, bias, stride, dilation)
    y = dwconv2d(_repeat_channels(x, weight.shape[0] // x.shape[1]), weight, bias, 1, padding, dilation,
                 impl="triton")
    return _subsample(y, stride)


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: the Triton kernels on CUDA for 'same' convs (see module doc), else the reference."""
    supported = _triton_supported(x, weight, stride, padding, dilation)
    s, m = _pair(stride)[0], weight.shape[0] // max(1, x.shape[1])
    # auto: Triton where benchmarks/bench_dwconv.py measured it faster than cuDNN (H100, bf16): dilated or >= 9x9
    # kernels; strided or channel-multiplier convs on channels-last inputs; the narrow maps of the whole-row kernels
    preferred = (_pair(dilation)[0] > 1 or weight.shape[-1] >= 9 or ((s > 1 or m > 1) and x.stride(1) == 1)
                 or (supported and triton_available() and _row_config(x, weight.shape[-1], 1) is not None))
    if resolve_impl(impl, x, supported, preferred,
                    op="dwconv2d", args=(x, weight, bias, stride, padding, dilation)) == "reference":
        return dwconv2d_reference(x, weight, bias, stride, padding, dilation)
    if torch.is_autocast_enabled(x.device.type):  # match F.conv2d's autocast behaviour
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    elif weight.dtype != x.dtype:
        raise TypeError(f"dwconv2d: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    weight, dil = weight.contiguous(), _pair(dilation)[0]
    if s > 1 or m > 1:
        return _strided_or_multiplied(x, weight, bias, s, padding, dil)
    if torch.compiler.is_compiling():  # an opaque custom op with a registered backward for torch.compile
        with torch.autocast(x.device.type, enabled=False):
            return torch.ops.metamixer.dwconv2d(x, weight, bias, dil)
    return _DWConv2dFn.apply(x, weight, bias, dil)  # eager: ~10x less per-call overhead than the custom op


class DWConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, out_dim, k, groups=dim)`` whose forward calls :func:`dwconv2d` (keys ``weight``/``bias``)."""

    def __init__(self, dim: int, kernel_size: int, stride: int = 1, padding: Optional[int] = None,
                 dilation: int = 1, bias: bool = True, out_dim: Optional[int] = None, device=None, dtype=None):
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        super().__init__(dim, out_dim or dim, kernel_size, stride, padding, dilation, groups=dim, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:  # m*C weights would also fit a C*m/k-channel input
            raise ValueError(f"{type(self).__name__}: expected (B, {self.in_channels}, H, W) input, got "
                             f"{tuple(x.shape)}")
        return dwconv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl


    @triton.jit
    def _dwconv_fwd_kernel(X, Wt, Bias, Y, C, H, W, sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                           K: tl.constexpr, DIL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_C: tl.constexpr,
                           FLIP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program: a BLOCK_H x BLOCK_W pixel tile of one image, BLOCK_C channels, all K*K taps.
        FLIP reads the kernel rotated by 180 degrees (the input gradient), without a flipped copy. Taps whose
        row or column falls outside the map for the whole tile are skipped (most of a dilated kernel's taps
        on a small map: VAN's 7x7 dilation 3 at 7x7 touches 25 of 49 for an 8x8 tile)."""
        pid_s, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tiles_w = tl.cdiv(W, BLOCK_W)
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        h0 = (pid_s // tiles_w) * BLOCK_H
        w0 = (pid_s % tiles_w) * BLOCK_W
        h1 = tl.minimum(h0 + BLOCK_H, H) - 1  # the tile's last row / column inside the map
        w1 = tl.minimum(w0 + BLOCK_W, W) - 1
        oh = h0 + p // BLOCK_W
        ow = w0 + p % BLOCK_W
        oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = (oc < C) if not EVEN_C else (oc >= 0)
        PAD: tl.constexpr = DIL * (K - 1) // 2
        # pointers of the tap at offset (-PAD, -PAD); each tap adds a scalar offset
        x_ptr = (X + pid_b.to(tl.int64) * sxb + oc[None, :] * sxc
                 + ((oh - PAD) * sxh + (ow - PAD) * sxw)[:, None])
        w_ptr = Wt + oc * (K * K)
        acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
        for i in range(K):
            dh = i * DIL - PAD
            if (h1 + dh >= 0) & (h0 + dh < H):
                ih = oh + dh
                hmask = (ih >= 0) & (ih < H)
                for j in tl.static_range(K):
                    dw = j * DIL - PAD
                    if (w1 + dw >= 0) & (w0 + dw < W):
                        iw = ow + dw
                        m = (hmask & (iw >= 0) & (iw < W))[:, None] & cmask[None, :]
                        xv = tl.load(x_ptr + (i * DIL * sxh + j * DIL * sxw), mask=m, other=0.0)
                        tap = (K * K - 1 - (i * K + j)) if FLIP else (i * K + j)
                        wv = tl.load(w_ptr + tap, mask=cmask, other=0.0)
                        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + oc, mask=cmask, other=0.0).to(tl.float32)[None, :]
        omask = ((oh < H) & (ow < W))[:, None] & cmask[None, :]
        y_ptr = Y + pid_b.to(tl.int64) * syb + oc[None, :] * syc + (oh * syh + ow * syw)[:, None]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=omask)

    @triton.jit
    def _dwconv_bwd_w_kernel(X, GY, GW, B, C, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, ROWS_PER_PROG,
                             K: tl.constexpr, KKP: tl.constexpr, DIL: tl.constexpr, BLOCK_C: tl.constexpr,
                             UNROLL: tl.constexpr, NEED_B: tl.constexpr):
        """Weight gradient, tap-stationary: the program keeps a (K*K, BLOCK_C) fp32 accumulator and walks a run of
        output rows (across images), pixel by pixel: per pixel it loads the grad vector once and the K x K input
        patch around it, so the sum over pixels never crosses threads. Each run writes its partial sums to
        GW[run] (no atomics: deterministic), laid out (C, K*K + NEED_B): with NEED_B, row K*K of the accumulator
        sums the grad itself (the bias gradient)."""
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
        is_b = (t == K * K)[:, None]
        row0 = pid_r * ROWS_PER_PROG
        row1 = tl.minimum(row0 + ROWS_PER_PROG, B * H)
        for r in range(row0, row1):
            b = r // H
            h = r % H
            hh = h + di
            rmask = tmask & (hh >= 0) & (hh < H)
            x_row = X + b.to(tl.int64) * sxb + h * sxh + patch
            g_row = GY + b.to(tl.int64) * sgb + h * sgh + oc * sgc
            for w0 in range(0, W, UNROLL):  # UNROLL independent pixels per step keep several loads in flight
                for u in tl.static_range(UNROLL):
                    w = w0 + u
                    g = tl.load(g_row + w * sgw, mask=cmask & (oc * 0 + w < W), other=0.0)
                    ww = w + dj
                    m = rmask & (ww >= 0) & (ww < W) & (t * 0 + w < W)
                    xv = tl.load(x_row + w * sxw, mask=m[:, None] & cmask[None, :], other=0.0)
                    xv = xv.to(tl.float32)
                    if NEED_B:
                        xv = tl.where(is_b, 1.0, xv)
                    acc += xv * g.to(tl.float32)[None, :]
        KK1: tl.constexpr = K * K + NEED_B
        out = GW + pid_r.to(tl.int64) * (KK1 * C) + oc[None, :] * KK1 + t[:, None]
        tl.store(out, acc, mask=(t < KK1)[:, None] & cmask[None, :])

    # ---- row-segment forward (channels-last, kernels up to 9x9) -----------------------------------------------
    _SEG_SRC = '''
def dwconv_seg_kernel(X, Wf, Bias, Y, C, H, W, NG, sxb, sxh, sxw, syb, syh, syw,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    pid_m, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = m // NG
    cg = m % NG
    base = (cg // {dil}) * {seg_span} + cg % {dil}
    oc = tl.max_contiguous(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), VEC)  # VEC channels per thread
    cmask = oc < C  # all true (BLOCK_C divides C): the masks' shape
    xb = X + pid_b.to(tl.int64) * sxb + oc[None, :]
    wb = Wf + oc[None, :]
{body}
'''

    def _seg_source(k: int, dil: int, seg: int, flip: bool) -> str:
        """Source of the row-segment forward kernel for a k x k conv with dilation ``dil``.

        Each thread owns ``seg`` output pixels of one row, ``dil`` columns apart (pixels ``base + dil * p``), and a
        vector of channels: for each kernel row it loads the ``seg + k - 1`` input vectors those pixels need once,
        converts them once and feeds each into up to k accumulators, with the row's k weight vectors (fp32) loaded
        once and used ``seg`` times. Tensor dimension 0 enumerates (output row, pixel group); one name per pixel
        and per input column, hence generated source. Weights come as fp32 (k*k, C); ``flip`` reads them rotated by
        180 degrees (the input gradient)."""
        hk, lines = (k - 1) // 2, []
        add = lines.append
        nq = seg + k - 1
        for q in range(nq):
            add(f"    col{q} = base + {dil * (q - hk)}")
            add(f"    xo{q} = (col{q} * sxw)[:, None]")
            add(f"    cm{q} = ((col{q} >= 0) & (col{q} < W))[:, None] & cmask[None, :]")
        for p in range(seg):
            add(f"    acc{p} = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)")
        add(f"    for kh in range({k}):")
        add(f"        r = o + (kh * {dil} - {hk * dil})")
        add("        rv = ((r >= 0) & (r < H))[:, None]")
        add("        xr = xb + (r * sxh)[:, None]")
        add(f"        wr = wb + ({k - 1} - kh) * {k} * C" if flip else f"        wr = wb + kh * {k} * C")
        for j in range(k):
            add(f"        w{j} = tl.load(wr + {k - 1 - j if flip else j} * C)")
        for q in range(nq):
            add(f"        xv = tl.load(xr + xo{q}, mask=rv & cm{q}, other=0.0).to(tl.float32)")
            for p in seg_outputs(q, k, seg):
                add(f"        acc{p} += xv * w{q - p}")
        add("    if HAS_BIAS:")
        add("        bias = tl.load(Bias + oc, mask=cmask, other=0.0).to(tl.float32)[None, :]")
        add("    else:")
        add("        bias = tl.zeros((1, BLOCK_C), dtype=tl.float32)")
        add("    yb = Y + pid_b.to(tl.int64) * syb + oc[None, :] + (o * syh)[:, None]")
        add("    ov = (o < H)[:, None] & cmask[None, :]")
        for p in range(seg):
            add(f"    tl.store(yb + (col{p + hk} * syw)[:, None], (acc{p} + bias).to(Y.dtype.element_ty), "
                f"mask=ov & cm{p + hk})")
        return _SEG_SRC.format(body="\n".join(lines), dil=dil, seg_span=seg * dil)

    # ---- whole-row forward (channels-last, narrow maps) --------------------------------------------------------
    ROW_MAX_W = 28  # see _row_config
    _ROW_SRC = '''
def dwconv_row_kernel(X, Wt, Bias, Y, B, C, H, sxb, sxh, sxw, syb, syh, syw,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    h, pid_c, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    oc = tl.max_contiguous(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), VEC)  # VEC channels per thread
    m = (b < B)[:, None] & (oc < C)[None, :]  # channels: all true (BLOCK_C divides C)
    xb = X + (b.to(tl.int64) * sxb)[:, None] + oc[None, :]
    wb = Wt + oc[None, :] * {kk}  # the (C, k*k) weights as they come
{body}
'''

    def _row_taps(k: int, dil: int, width: int):
        """Per input column q of a ``width``-wide row: the (output column p, kernel column j) pairs it meets."""
        hk = (k - 1) // 2
        return [[(p, j) for j in range(k) if 0 <= (p := q - dil * (j - hk)) < width] for q in range(width)]

    def _add_row_taps(add, taps, fma: str) -> None:
        """The whole-row kernels' inner loop: each input vector of row ``xr`` loaded once, then ``fma`` (formatted
        with p and j) for each output it meets."""
        for q, pairs in enumerate(taps):
            if pairs:
                add(f"            xv = tl.load(xr + {q} * sxw, mask=m, other=0.0).to(tl.float32)")
            for p, j in pairs:
                add("            " + fma.format(p=p, j=j))

    def _row_source(k: int, dil: int, width: int, flip: bool) -> str:
        """Source of the whole-row forward kernel for maps ``width`` pixels wide (a compile-time constant).

        A program owns one output row ``h`` (grid axis 0) of BLOCK_M images x BLOCK_C channels; each thread keeps
        the row's ``width`` accumulators for its image and VEC channels. Per kernel row whose input row lies inside
        the map (a scalar test: the dead rows of a dilated kernel on a small map are skipped), it loads each of the
        ``width`` input vectors once and adds it into exactly the outputs it reaches: the column bounds are known at
        compile time, so no tap outside the map is computed or masked (VAN's 7x7 dilation 3 on a 7x7 map: 5.9 of
        49 taps per pixel)."""
        hk, lines = (k - 1) // 2, []
        add = lines.append
        for p in range(width):
            add(f"    acc{p} = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)")
        add(f"    for kh in range({k}):")
        add(f"        r = h + kh * {dil} - {hk * dil}")
        add("        if (r >= 0) & (r < H):")
        add("            xr = xb + r * sxh")
        add(f"            wr = wb + ({k - 1} - kh) * {k}" if flip else f"            wr = wb + kh * {k}")
        taps = _row_taps(k, dil, width)
        for j in sorted({j for pj in taps for _, j in pj}):
            add(f"            w{j} = tl.load(wr + {k - 1 - j if flip else j}).to(tl.float32)")
        _add_row_taps(add, taps, "acc{p} += xv * w{j}")
        add("    if HAS_BIAS:")
        add("        bias = tl.load(Bias + oc, mask=oc < C, other=0.0).to(tl.float32)[None, :]")
        add("    else:")
        add("        bias = tl.zeros((1, BLOCK_C), dtype=tl.float32)")
        add("    yb = Y + (b.to(tl.int64) * syb)[:, None] + oc[None, :] + h * syh")
        for p in range(width):
            add(f"    tl.store(yb + {p} * syw, (acc{p} + bias).to(Y.dtype.element_ty), mask=m)")
        return _ROW_SRC.format(body="\n".join(lines), kk=k * k)

    def _jit_source(src: str, name: str, fn: str):
        """Triton JIT function ``fn`` from generated source (registered with linecache so Triton can read it)."""
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        scope = {"tl": tl}
        exec(compile(src, name, "exec"), scope)
        return triton.jit(scope[fn])

    @functools.lru_cache(maxsize=None)
    def _gen_kernel(kind: str, *args):
        """The generated kernel ``dwconv_{kind}_kernel`` from ``_{kind}_source(*args)`` (seg, row, segw, roww)."""
        return _jit_source(globals()[f"_{kind}_source"](*args), f"<metamixer dwconv {kind} {args}>",
                           f"dwconv_{kind}_kernel")

    def _launch_row(x, w, b, dil, flip, cfg):
        B, C, H, W = x.shape
        k = w.shape[-1]
        bc, nw, vec = cfg
        bm = 32 * nw * vec // bc
        y = torch.empty_like(x)
        grid = (H, C // bc, triton.cdiv(B, bm))
        _gen_kernel("row", k, dil, W, flip)[grid](x, w, b if b is not None else w, y, B, C, H, x.stride(0),
                                                  x.stride(2), x.stride(3), y.stride(0), y.stride(2), y.stride(3),
                                                  HAS_BIAS=b is not None, BLOCK_M=bm, BLOCK_C=bc, VEC=vec, num_warps=nw)
        return y

    def _seg_geometry(W: int, dil: int, cfg) -> Tuple[int, int]:
        """(BLOCK_M, pixel groups per row) of a row-segment config: bc // vec threads along channels, the rest
        along pixel groups; groups of ``seg`` pixels per residue class modulo the dilation."""
        seg, bc, nw, vec = cfg
        return 32 * nw * vec // bc, dil * triton.cdiv(triton.cdiv(W, dil), seg)

    def _launch_seg(x, w, b, dil, flip, cfg):
        B, C, H, W = x.shape
        k = w.shape[-1]
        seg, bc, nw, vec = cfg
        bm, ng = _seg_geometry(W, dil, cfg)
        y = torch.empty_like(x)
        wf = torch.empty(k * k, C, device=x.device, dtype=torch.float32).copy_(w.reshape(C, k * k).t())
        grid = (triton.cdiv(H * ng, bm), triton.cdiv(C, bc), B)
        _gen_kernel("seg", k, dil, seg, flip)[grid](x, wf, b if b is not None else wf, y, C, H, W, ng,
                                             x.stride(0), x.stride(2), x.stride(3), y.stride(0), y.stride(2),
                                             y.stride(3), HAS_BIAS=b is not None, BLOCK_M=bm, BLOCK_C=bc, VEC=vec,
                                             num_warps=nw)
        return y

    def _blocks(x: torch.Tensor, k: int) -> Tuple[int, int, int, int]:
        """Forward tile (BLOCK_H, BLOCK_W, BLOCK_C, num_warps): channels-last vectorises over C, NCHW over W.

        Chosen from benchmarks/tune_dwconv.py on an H100 (bf16): 64 channels x 4x8 pixels for k <= 5 and 8x8 pixels
        for larger kernels; a channel block that divides C when C is not a multiple of 64 (C=80: 16). (Channels-last
        maps with a multiple of 8 channels and kernels from 5x5 take the whole-row kernel instead.) Maps of at
        most 16x16 take one-warp programs of ~512-1024 values (up to 8x8 maps: 2x4 pixels x 64 channels, or 4x8 x
        16-32; up to 16x16: 4x8 x 32): many more programs, each skipping more of a dilated kernel's dead taps.
        In CUDA-graph time VAN's 7x7 dilation 3 took 5.7 us at 7x7 (C256; 8.0 with 4x4 x 32 x 2 warps) and 17.7 us
        at 14x14 (C160), against cuDNN's 47.3 / 148.8 us.
        (Triton's autotuner picked worse tiles than this rule in repeated runs, so there is none.)"""
        C, H, W = x.shape[1:]
        if x.stride(1) != 1:
            bc, bw = min(4, triton.next_power_of_2(C)), min(32, triton.next_power_of_2(W))
            bh = max(1, 1024 // (bc * bw))
            return min(bh, triton.next_power_of_2(H)), bw, bc, 4
        tiny, small = max(H, W) <= 8, max(H, W) <= 16
        bc = min(64 if tiny or not small else 32, triton.next_power_of_2(C))
        while bc > 16 and C % bc:
            bc //= 2
        if small:
            bh, bw, nw = (2, 4, 1) if tiny and bc == 64 else (4, 8, 1)
        else:
            bh, bw, nw = (4, 8, 4) if k <= 5 else (8, 8, 4)
        return min(bh, triton.next_power_of_2(H)), min(bw, triton.next_power_of_2(W)), bc, nw

    _SEGW_SRC = '''
def dwconv_segw_kernel(X, GY, Part, C, H, W, NG, M, ITERS, sxb, sxh, sxw, sgb, sgh, sgw,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, NEED_B: tl.constexpr):
    pid_r, pid_c, kh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    oc = tl.max_contiguous(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), VEC)
    cm = (oc < C)[None, :]  # all true (BLOCK_C divides C): the masks' shape
    xc = X + oc[None, :]
    gc = GY + oc[None, :]
{body}
'''

    def _segw_source(k: int, dil: int, seg: int) -> str:
        """Source of the row-segment weight-gradient kernel: ``dW[kh, kw] = sum grad(o, w) * x(o + kh, w + kw)``
        (offsets times the dilation, minus the padding). A program owns one kernel row ``kh`` (grid axis 2) and a run
        of ``ITERS`` blocks of (image, output row, pixel group) rows, as in the forward: per block it loads the
        ``seg`` grad vectors of its pixels and the ``seg + k - 1`` input vectors they meet once and adds their
        products into k accumulators (one per kw); the block rows are summed at the end, one partial per run, in
        slots 0..k-1 of Part's (run, kh) row; with NEED_B slot k sums the grad itself (every kernel row's programs
        load every pixel's grad, so each kh's slot k is the bias gradient)."""
        hk, lines = (k - 1) // 2, []
        add = lines.append
        for j in range(k + 1):
            add(f"    acc{j} = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)")
        add("    for it in range(ITERS):")
        add("        m = (pid_r * ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)")
        add("        mv = m < M")
        add("        b = (m // (H * NG)).to(tl.int64)")
        add("        o = (m // NG) % H")
        add("        cg = m % NG")
        add(f"        base = (cg // {dil}) * {seg * dil} + cg % {dil}")
        add(f"        r = o + (kh * {dil} - {hk * dil})")
        add("        rv = (mv & (r >= 0) & (r < H))[:, None] & cm")
        add("        xr = xc + (b * sxb + r * sxh)[:, None]")
        add("        gr = gc + (b * sgb + o * sgh)[:, None]")
        for p in range(seg):
            add(f"        col = base + {dil * p}")
            add(f"        g{p} = tl.load(gr + (col * sgw)[:, None], mask=(mv & (col < W))[:, None] & cm, other=0.0)"
                ".to(tl.float32)")
            add("        if NEED_B:")
            add(f"            acc{k} += g{p}")
        for q in range(seg + k - 1):
            add(f"        col = base + {dil * (q - hk)}")
            add("        xv = tl.load(xr + (col * sxw)[:, None], mask=rv & ((col >= 0) & (col < W))[:, None], "
                "other=0.0).to(tl.float32)")
            for p in seg_outputs(q, k, seg):
                add(f"        acc{q - p} += g{p} * xv")
        _store_partials(add, k)
        return _SEGW_SRC.format(body="\n".join(lines))

    def _store_partials(add, k: int) -> None:
        """The weight-gradient kernels' epilogue: accumulators 0..k summed over the block rows into Part[run, kh]."""
        add(f"    out = Part + (pid_r * {k} + kh) * C * {k + 1} + oc")
        for j in range(k + 1):
            add(f"    tl.store(out + {j} * C, tl.sum(acc{j}, axis=0))")

    def _launch_segw(x, grad, k, dil, need_b, cfg):
        B, C, H, W = x.shape
        seg, bc, nw, vec = cfg
        bm, ng = _seg_geometry(W, dil, cfg)
        m_total = B * H * ng
        return _launch_partials(_gen_kernel("segw", k, dil, seg), x, grad, k, triton.cdiv(m_total, bm), C // bc, need_b,
                                (C, H, W, ng, m_total), BLOCK_M=bm, BLOCK_C=bc, VEC=vec, num_warps=nw)

    def _launch_partials(kernel, x, grad, k, units, c_blocks, need_b, head, **meta):
        """Run a weight-gradient kernel with one kernel row per program (grid axis 2) over runs of its ``units``
        (blocks of pixel rows), ~8 programs per SM, arguments ``(x, grad, part, *head, iters, strides...)``; returns
        ``_split_sums`` of its (runs, k, k + 1, C) partials."""
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        runs = max(1, min(units, 8 * sms // (c_blocks * k)))
        iters = triton.cdiv(units, runs)
        runs = triton.cdiv(units, iters)
        part = torch.empty(runs, k, k + 1, x.shape[1], device=x.device, dtype=torch.float32)
        kernel[(runs, c_blocks, k)](x, grad, part, *head, iters, x.stride(0), x.stride(2), x.stride(3),
                                    grad.stride(0), grad.stride(2), grad.stride(3), NEED_B=need_b, **meta)
        return _split_sums(part, k, need_b)

    def _split_sums(part: torch.Tensor, k: int, need_b: bool):
        """((C, k, k) weight-gradient sums, (C,) bias-gradient sums or None) from (runs, k, k + 1, C) partials
        whose slot k holds the grad sums (each kernel row's: the centre row's, whose input row is always inside)."""
        sums = part.sum(0)
        return sums[:, :k].permute(2, 0, 1), (sums[(k - 1) // 2, k] if need_b else None)

    _ROWW_SRC = '''
def dwconv_roww_kernel(X, GY, Part, B, C, H, NH, ITERS, sxb, sxh, sxw, sgb, sgh, sgw,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, NEED_B: tl.constexpr):
    pid_r, pid_c, kh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    oc = tl.max_contiguous(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), VEC)
    bb = tl.arange(0, BLOCK_M)
{body}
'''

    def _roww_source(k: int, dil: int, width: int) -> str:
        """Source of the whole-row weight-gradient kernel (the whole-row forward's maps): a program owns one kernel
        row ``kh`` (grid axis 2) and a run of ``ITERS`` (image block, output row) pairs. Per pair whose input row lies
        inside the map it loads the ``width`` grad vectors and the ``width`` input vectors of the two rows once and
        adds exactly the in-map products into k accumulators (one per kw); with NEED_B slot k sums the grad (only
        the centre row's programs see every pixel: its slot is the bias gradient). Partials as in the row-segment
        kernel: Part[run, kh, 0..k]."""
        hk, lines = (k - 1) // 2, []
        add = lines.append
        for j in range(k + 1):  # taps that never meet the map keep zeros
            add(f"    acc{j} = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)")
        add("    for it in range(ITERS):")
        add("        idx = pid_r * ITERS + it")
        add("        h = idx % H")
        add(f"        r = h + kh * {dil} - {hk * dil}")
        add("        if (idx < NH) & (r >= 0) & (r < H):")
        add("            b = (idx // H) * BLOCK_M + bb")
        add("            m = (b < B)[:, None] & (oc < C)[None, :]  # channels: all true (BLOCK_C divides C)")
        add("            gr = GY + (b.to(tl.int64) * sgb)[:, None] + oc[None, :] + h * sgh")
        add("            xr = X + (b.to(tl.int64) * sxb)[:, None] + oc[None, :] + r * sxh")
        for p in range(width):
            add(f"            g{p} = tl.load(gr + {p} * sgw, mask=m, other=0.0).to(tl.float32)")
            add("            if NEED_B:")
            add(f"                acc{k} += g{p}")
        _add_row_taps(add, _row_taps(k, dil, width), "acc{j} += g{p} * xv")
        _store_partials(add, k)
        return _ROWW_SRC.format(body="\n".join(lines))

    def _launch_roww(x, grad, k, dil, need_b, cfg):
        B, C, H, W = x.shape
        bc, nw, vec = cfg
        bm = 32 * nw * vec // bc
        nh = triton.cdiv(B, bm) * H
        return _launch_partials(_gen_kernel("roww", k, dil, W), x, grad, k, nh, C // bc, need_b, (B, C, H, nh),
                                BLOCK_M=bm, BLOCK_C=bc, VEC=vec, num_warps=nw)

    def _seg_config(x: torch.Tensor, k: int, dil: int) -> Optional[Tuple[int, int, int, int]]:
        """(pixels per thread, BLOCK_C, num_warps, channels per thread) of the row-segment kernel, or None for the
        tap-loop kernel. From benchmarks/tune_dwconv.py on an H100 (bf16): the row-segment kernel for channels-last
        inputs with a multiple of 8 channels, 5x5 to 9x9 kernels and rows of at least 7 pixels per residue class
        modulo the dilation; 3x3 convs are memory-bound and as fast on the tap loop; 4 channels per thread (fewer
        registers than 8: 145 vs 252, 3 blocks per SM instead of 2)."""
        B, C, H, W = x.shape
        seg = 7
        if x.stride(1) != 1 or C % 8 or not 5 <= k <= 9 or triton.cdiv(W, dil) < seg:
            return None
        bc = next(c for c in (64, 32, 16, 8) if C % c == 0)
        bm4, ng = _seg_geometry(W, dil, (seg, bc, 4, 4))
        nw = 4 if H * ng >= 2 * bm4 else 2  # small maps: half the rows per block
        return seg, bc, nw, 4

    def _row_config(x: torch.Tensor, k: int, dil: int) -> Optional[Tuple[int, int, int]]:
        """(BLOCK_C, num_warps, channels per thread) of the whole-row kernels, or None: channels-last inputs with a
        multiple of 8 channels, kernels from 5x5 (3x3 convs are memory-bound), maps up to 28 pixels wide, or 56
        with dilation. On an H100 (bf16, CUDA-graph time) their forward is 1.1-1.8x
        faster than the row-segment/tap-loop kernels there (VAN's 7x7 dilation 3: 7.5 vs 17.7 us at 14x14, 3.4 vs
        5.6 at 7x7, 28.6 vs 39.5 at 56x56 C32); on undilated 56-wide maps a tie with the row-segment kernel."""
        B, C, H, W = x.shape
        if x.stride(1) != 1 or C % 8 or k < 5 or W > (ROW_MAX_W if dil == 1 else 2 * ROW_MAX_W):
            return None
        bc = next(c for c in (32, 16, 8) if C % c == 0)
        return (bc, 1, 4) if W <= ROW_MAX_W else (bc, 2, 2)

    def _kernel_config(x: torch.Tensor, k: int, dil: int, cfg):
        """``cfg`` when given (a config to force: a 3-tuple for the whole-row kernels, a 4-tuple for the
        row-segment ones, False for the tap-loop/tap-stationary ones), else ``_row_config``'s, else
        ``_seg_config``'s (None: the tap kernels)."""
        return (_row_config(x, k, dil) or _seg_config(x, k, dil)) if cfg is None else cfg

    def _launch_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], dil: int,
                    flip: bool = False, cfg=None) -> torch.Tensor:
        """Forward (or, with ``flip``, the input gradient) on the kernel ``_kernel_config`` picks."""
        k = w.shape[-1]
        cfg = _kernel_config(x, k, dil, cfg)
        if cfg and len(cfg) == 3:
            return _launch_row(x, w, b, dil, flip, cfg)
        if cfg:
            return _launch_seg(x, w, b, dil, flip, cfg)
        B, C, H, W = x.shape
        y = torch.empty_like(x)
        args = (x, w, b if b is not None else w, y, C, H, W, *x.stride(), *y.stride())
        bh, bw, bc, nw = _blocks(x, k)
        grid = (triton.cdiv(H, bh) * triton.cdiv(W, bw), triton.cdiv(C, bc), B)
        _dwconv_fwd_kernel[grid](*args, K=k, DIL=dil, HAS_BIAS=b is not None, EVEN_C=C % bc == 0, FLIP=flip,
                                 BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=nw)
        return y

    def _bwd_w_blocks(C: int, k: int) -> Tuple[int, int, int]:
        kkp = triton.next_power_of_2(k * k + 1)  # odd k >= 3: the same as k*k's; the spare row holds the bias sum
        bc = max(16, min(64, 8192 // kkp, triton.next_power_of_2(C)))
        while bc > 16 and C % bc:  # prefer a width that divides C (C=80: 5 x 16 rather than 64 + 16 of 64)
            bc //= 2
        return kkp, bc, 8 if kkp * bc > 4096 else 4

    def _launch_bwd_w(x: torch.Tensor, grad: torch.Tensor, k: int, dil: int, need_b: bool, cfg=None):
        """((C, k, k) weight-gradient sums, (C,) bias-gradient sums or None), fp32, on the kernel
        ``_kernel_config`` picks (the forward's family; the tap-stationary kernel for the tap loop)."""
        cfg = _kernel_config(x, k, dil, cfg)
        if cfg and len(cfg) == 3:
            return _launch_roww(x, grad, k, dil, need_b, cfg)
        if cfg:
            return _launch_segw(x, grad, k, dil, need_b, cfg)
        B, C, H, W = x.shape
        kkp, bc, nw = _bwd_w_blocks(C, k)
        c_blocks = triton.cdiv(C, bc)
        # many short runs of rows: the loop is latency-bound, so occupancy hides the load latency
        target = 32 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1)
        rows = B * H
        per = triton.cdiv(rows, max(1, min(rows, target // c_blocks)))
        runs = triton.cdiv(rows, per)
        part = torch.empty(runs, C, k * k + need_b, device=x.device, dtype=torch.float32)
        _dwconv_bwd_w_kernel[(runs, c_blocks)](x, grad, part, B, C, H, W, *x.stride(), *grad.stride(), per,
                                               K=k, KKP=kkp, DIL=dil, BLOCK_C=bc, UNROLL=4, NEED_B=need_b,
                                               num_warps=nw)
        sums = part.sum(0)
        return sums[:, :k * k].view(C, k, k), (sums[:, k * k] if need_b else None)

    @torch.library.custom_op("metamixer::dwconv2d", mutates_args=())
    def _dwconv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int) -> torch.Tensor:
        return _launch_fwd(x, weight, bias, dilation)

    @_dwconv2d_op.register_fake
    def _(x, weight, bias, dilation):
        return torch.empty_like(x)

    def _like_x(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """grad in x's memory format (both backward kernels tile the two tensors alike)."""
        if grad.stride() == x.stride():
            return grad
        return grad.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)

    def _dwconv2d_bwd_impl(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int,
                           need_x: bool, need_w: bool, need_b: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_x, grad_weight, grad_bias); a 1-element placeholder for each one not needed (size-0 tensors would
        share data pointer 0, which the custom op's no-aliasing check rejects)."""
        C, k = weight.shape[0], weight.shape[-1]
        grad = _like_x(grad, x)
        gx = _launch_fwd(grad, weight, None, dilation, flip=True) if need_x else x.new_empty(1)
        gw, gb = weight.new_empty(1), grad.new_empty(1)
        if need_w:
            ws, bs = _launch_bwd_w(x, grad, k, dilation, need_b)
            gw = ws.to(weight.dtype).contiguous().reshape(C, 1, k, k)  # one copy
            if need_b:
                gb = bs.to(grad.dtype, copy=True)  # its own contiguous storage (the fake kernel says so)
        elif need_b:
            gb = grad.sum((0, 2, 3), dtype=torch.float32).to(grad.dtype)
        return gx, gw, gb

    _dwconv2d_bwd_op = torch.library.custom_op("metamixer::dwconv2d_backward", _dwconv2d_bwd_impl, mutates_args=())

    @_dwconv2d_bwd_op.register_fake
    def _(grad, x, weight, dilation, need_x, need_w, need_b):  # the real op's layouts: gx like grad in x's format
        return (torch.empty_like(_like_x(grad, x)) if need_x else x.new_empty(1),
                weight.new_empty(weight.shape) if need_w else weight.new_empty(1),
                grad.new_empty(weight.shape[0]) if need_b else grad.new_empty(1))

    def _setup_context(ctx, inputs, output):
        x, weight, bias, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        ctx.has_bias = bias is not None

    def _grads(bwd, ctx, grad):
        """(dx, dw, db, None) from ``bwd`` (the backward op or its eager implementation), None where not needed."""
        x, weight = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        grads = bwd(grad, x, weight, ctx.dilation, *need)
        return (*(g if n else None for g, n in zip(grads, need)), None)

    def _backward(ctx, grad):
        return _grads(_dwconv2d_bwd_op, ctx, grad)

    _dwconv2d_op.register_autograd(_backward, setup_context=_setup_context)

    class _DWConv2dFn(torch.autograd.Function):
        """The same forward/backward as the custom op, without its dispatch overhead (eager mode)."""

        @staticmethod
        def forward(ctx, x, weight, bias, dilation):
            _setup_context(ctx, (x, weight, bias, dilation), None)
            return _launch_fwd(x, weight, bias, dilation)

        @staticmethod
        def backward(ctx, grad):
            return _grads(_dwconv2d_bwd_impl, ctx, grad)

    class _StridedDWConv2dFn(torch.autograd.Function):
        """Stride s / multiplier m (eager): saves x and recomputes its m-fold copy in the backward, where the
        stride-1 conv's gradients come from the output gradient scattered to every s-th pixel."""

        @staticmethod
        def forward(ctx, x, weight, bias, stride, dilation):
            ctx.save_for_backward(x, weight)
            ctx.stride, ctx.dilation, ctx.has_bias = stride, dilation, bias is not None
            return _subsample(_launch_fwd(_repeat_channels(x, weight.shape[0] // x.shape[1]), weight, bias, dilation),
                              stride)

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            m, s = weight.shape[0] // x.shape[1], ctx.stride
            xm = _repeat_channels(x, m)
            full = grad
            if s > 1:
                full = torch.zeros_like(xm, dtype=grad.dtype)
                full[:, :, ::s, ::s] = grad
            need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
            gx, gw, gb = _dwconv2d_bwd_impl(full, xm, weight, ctx.dilation, *need)
            if need[0] and m > 1:  # each input channel fed m output channels
                gx = gx.unflatten(1, (x.shape[1], m)).sum(2)
            return (*(g if n else None for g, n in zip((gx, gw, gb), need)), None, None)

register_op("dwconv2d", dwconv2d)
