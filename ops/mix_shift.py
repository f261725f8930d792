"""Mix-shift: the token mixer of MS-MLP (Zheng et al., arXiv:2202.06510), as one op.

Semantics (``x`` is ``(B, C, H, W)``; ``shifts = (s_0, .., s_{G-1})``; ``weights``/``biases`` hold one sequence per
direction, direction 0 = "lr" (shift along W, dim 3), direction 1 = "td" (shift along H, dim 2)):

1. Channel groups exactly as ``torch.chunk(x, G, dim=1)``: every group has ``ceil(C / G)`` channels except the last,
   which gets the remainder (C=96, G=5: 20,20,20,20,16). ``torch.chunk`` can return fewer than ``G`` chunks (C=8,
   G=5 gives 2,2,2,2); that is an error here (see :func:`mix_shift_chunk_sizes`).
2. For group ``g`` (channels ``c`` of the group, local index ``c'``) and direction ``d`` the group is rolled
   circularly by ``s_g`` along that direction's axis (``torch.roll`` semantics, so ``y[.., w] = x[.., (w - s_g) mod W]``
   for "lr" and likewise over H for "td"), then convolved depthwise with ``weights[d][g]`` of shape
   ``(C_g, 1, kh, kw)`` (odd kh, kw; cross-correlation as ``F.conv2d``), zero padding ``(kh // 2, kw // 2)`` and
   bias ``biases[d][g]`` (``(C_g,)`` or None). The zero padding applies AFTER the roll: for "lr",
   ``out_d[b, c, h, w] = bias[c'] + sum_{i, j} W[c', 0, i, j] * x[b, c, h + i - kh//2, (w + j - kw//2 - s_g) mod W]``
   where terms with ``h + i - kh//2`` outside ``[0, H)`` or ``w + j - kw//2`` outside ``[0, W)`` are zero ("td" is the
   same with the roll on the H index instead).
3. The groups of each direction are concatenated back in channel order and the two directions summed:
   ``out = out_lr + out_td`` (same shape and dtype as ``x``).

In MS-MLP the kernel size grows with the shift distance (1, 3, 5, 7), so a fused kernel can fold each group's roll
into the depthwise conv's input indexing instead of materialising rolled copies. ``mix_shift_reference`` is the
definition (its depthwise convs are :func:`ops.dwconv.dwconv2d_reference`); ``mix_shift`` is the dispatcher models
call.

Triton path (``impl='triton'``, or ``auto`` on CUDA; float64 always takes the reference): any group sizes, odd kernel
sizes and shifts; NCHW or channels-last (any strides; the output keeps the input's memory format); fp32/fp16/bf16
with fp32 accumulation; under autocast inputs are cast like ``F.conv2d`` would. One launch per pass:
  * forward: a program computes a tile of (pixels x channels) of one image for one group's channels in a block of
    channels starting at a multiple of the block size (a small table lists each (block, group) pair: lanes, shift,
    kernel sizes, weight offsets), summing both directions: the roll is a modular index on the rolled axis, the
    zero padding is tested BEFORE the wrap (on the rolled image's coordinates), so nothing rolled is materialised.
    Blocks inside one group take an unmasked path (16-byte loads in channels-last; each row of taps unrolled for
    the 1x1/3x3/5x5/7x7 kernels MS-MLP uses); a block straddling a group boundary runs once per group, masked;
  * input gradient: the adjoint, the same kernel with flipped weights and the roll moved to the output side
    (``grad_x = roll(conv(grad, flip(W)), -s)`` per direction, both summed);
  * weight gradient: tap-stationary: a program keeps a (taps x channels) fp32 accumulator and walks a run of output
    rows pixel by pixel (no cross-thread reduction per tap), then adds it into an fp32 buffer with one atomic per
    (tap, channel); both directions in one launch. Bias gradient: a sum over the output gradient (the same for
    both directions).
Row-segment kernels (channels-last input whose groups' kernels are square and the same in both directions, as in
MS-MLP; generated Triton source, one branch per kernel size): a program covers up to 64 channels of ONE group (so
its kernel size and shift are uniform), a thread owns 7 consecutive output pixels of a row and one channel and
loads the 7 + k - 1 input values of each kernel row once for up to k accumulators. Forward: both directions in one
pass. Input gradient: two passes, td's gradient (the conv of grad centred on row (h + s) mod H), then lr's computed
at consecutive centres and added into the rolled output columns (both directions cannot slide along one row).
Weight gradient: one kernel row per program, per-run fp32 partial sums summed on the host (no atomics).
msmlp_t's stages at batch 64 on an H100: forward+backward 3.5-7.3x the reference in GPU time, 2.7-5.2x the
tap-loop kernels below (benchmarks/bench_mix_shift_lka.py, README).
All kernels of all groups are passed as one flat tap-major buffer (``torch.cat`` and one gather, so their
gradients flow back through autograd).
Eager calls go through a ``torch.autograd.Function`` (a ``torch.library.custom_op`` costs ~50 us more per call);
under ``torch.compile`` the same kernels are the custom op ``metamixer::mix_shift`` with its backward registered
(an opaque op, no graph break).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch

from ._dispatch import resolve_impl, triton_available, register_op
from .dwconv import dwconv2d_reference, seg_outputs

__all__ = ["mix_shift", "mix_shift_reference", "mix_shift_chunk_sizes"]

# (direction name, tensor dim that direction rolls): the order of ``weights`` / ``biases``.
_DIRECTIONS = (("lr", 3), ("td", 2))


def mix_shift_chunk_sizes(channels: int, groups: int) -> List[int]:
    """Channel count of each ``torch.chunk(x, groups, dim=1)`` group; raises if torch.chunk gives fewer groups."""
    size = math.ceil(channels / groups)
    n = math.ceil(channels / size)
    if n != groups:
        raise ValueError(
            f"mix-shift splits channels like torch.chunk: {channels} channels in chunks of {size} give {n} groups, "
            f"not {groups}; choose a channel count for which torch.chunk yields exactly {groups} chunks")
    return [size] * (n - 1) + [channels - size * (n - 1)]


def _check_args(x: torch.Tensor, weights: Sequence[Sequence[torch.Tensor]],
                biases: Sequence[Sequence[Optional[torch.Tensor]]], shifts: Sequence[int]) -> List[int]:
    """Validate the arguments (one clear error each); return the group sizes."""
    groups = len(shifts)
    if len(weights) != len(_DIRECTIONS) or len(biases) != len(_DIRECTIONS):
        raise ValueError(f"weights and biases need one sequence per direction {[d for d, _ in _DIRECTIONS]}")
    if any(len(w) != groups for w in weights) or any(len(b) != groups for b in biases):
        raise ValueError(f"every direction needs {groups} kernels and biases (one per shift)")
    sizes = mix_shift_chunk_sizes(x.shape[1], groups)  # raises where torch.chunk would not give `groups` chunks
    for (name, _), ws in zip(_DIRECTIONS, weights):
        for w in ws:
            kh, kw = w.shape[-2:]
            if kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"mix-shift kernels must have odd sizes, got {kh}x{kw} in direction {name!r}")
    return sizes


def mix_shift_reference(x: torch.Tensor, weights: Sequence[Sequence[torch.Tensor]],
                        biases: Sequence[Sequence[Optional[torch.Tensor]]], shifts: Sequence[int]) -> torch.Tensor:
    """Mix-shift of ``x`` (B, C, H, W); see the module docstring for the exact definition."""
    _check_args(x, weights, biases, shifts)
    xs = torch.chunk(x, len(shifts), dim=1)
    out = None
    for (name, dim), ws, bs in zip(_DIRECTIONS, weights, biases):
        parts = []
        for xg, shift, w, b in zip(xs, shifts, ws, bs):
            kh, kw = w.shape[-2:]
            parts.append(dwconv2d_reference(torch.roll(xg, shift, dim), w, b, padding=(kh // 2, kw // 2)))
        y = torch.cat(parts, dim=1)
        out = y if out is None else out + y
    return out


def _triton_supported(x: torch.Tensor, weights: Sequence[Sequence[torch.Tensor]], sizes: Sequence[int]) -> bool:
    return (x.ndim == 4 and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and all(w.ndim == 4 and tuple(w.shape[:2]) == (c, 1) for ws in weights for w, c in zip(ws, sizes)))


def mix_shift(x: torch.Tensor, weights: Sequence[Sequence[torch.Tensor]],
              biases: Sequence[Sequence[Optional[torch.Tensor]]], shifts: Sequence[int],
              impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: Triton kernels on CUDA where available (see ``ops._dispatch``), else the reference."""
    sizes = _check_args(x, weights, biases, shifts)
    # auto takes the kernels on CUDA: msmlp_t trains 1.7x / infers 1.9x faster than on the reference
    # (benchmarks/bench_models.py, H100, bf16, batch 256; row-segment kernels)
    if resolve_impl(impl, x, _triton_supported(x, weights, sizes),
                    op="mix_shift", args=(x, weights, biases, shifts)) == "reference":
        return mix_shift_reference(x, weights, biases, shifts)
    if torch.is_autocast_enabled(x.device.type):  # match F.conv2d's autocast behaviour
        dt = torch.get_autocast_dtype(x.device.type)
    else:
        dt = x.dtype
        if any(w.dtype != dt for ws in weights for w in ws):
            raise TypeError(f"mix_shift: input dtype {dt} and the kernels' dtypes differ")
    ksizes = tuple(tuple(tuple(w.shape[-2:]) for w in ws) for ws in weights)
    key = (tuple(sizes), ksizes, tuple(int(s) for s in shifts))
    # every kernel tap-major, (kh * kw, C_g), so a tap's weights for a block of channels are one contiguous load:
    # one cat of the natural layouts, then one gather (fewer small ops per call than transposing each kernel)
    wflat = torch.cat([w.to(dt).reshape(-1) for ws in weights for w in ws])[_tap_index(key, x.device)]
    bflat = None
    if any(b is not None for bs in biases for b in bs):
        bflat = torch.cat([(b.to(dt) if b is not None else x.new_zeros(c, dtype=dt)).reshape(-1)
                           for bs in biases for b, c in zip(bs, sizes)])
    channels_last = x.stride(1) == 1 and x.shape[1] > 1
    seg = channels_last and _seg_applies(ksizes)  # the row-segment kernels, else the tap-loop ones
    block_c = _seg_block_c(sizes) if seg else _block_c(sizes, channels_last)
    table = _block_table(key, block_c, x.device, seg)
    kk_max = max(kh * kw for ks in ksizes for kh, kw in ks)
    seg_ks = sorted({kh for kh, _ in ksizes[0]}) if seg else []
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():  # an opaque custom op with a registered backward for torch.compile
            return torch.ops.metamixer.mix_shift(x.to(dt), wflat, bflat, table, block_c, kk_max, seg_ks)
        return _MixShiftFn.apply(x.to(dt), wflat, bflat, table, block_c, kk_max, seg_ks)  # eager: less overhead


def _rows_for(sizes: Sequence[int], block_c: int) -> List[Tuple[int, int, int, int]]:
    """(block start, group, first lane, end lane) for every (aligned channel block, group) pair that intersect."""
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    out = []
    for b0 in range(0, sum(sizes), block_c):
        b1 = min(b0 + block_c, sum(sizes))
        for g, (gs, c) in enumerate(zip(starts, sizes)):
            lo, hi = max(gs, b0), min(gs + c, b1)
            if lo < hi:
                out.append((b0, g, lo - b0, hi - b0))
    return out


def _block_c(sizes: Sequence[int], channels_last: bool) -> int:
    """Channels per program. Blocks start at multiples of the block size (so the compiler can prove 16-byte
    alignment and vectorise the loads); a block that straddles a group boundary is processed once per group with
    a channel mask (the slower masked path). The largest block whose work (rows x lanes) stays within ~20% of C."""
    cands = (64, 32, 16, 8, 4, 2, 1) if channels_last else (4, 2, 1)
    for bc in cands:
        if len(_rows_for(sizes, bc)) * bc <= 1.2 * sum(sizes):
            return bc
    return cands[-1]


# one row per (channel block, group) pair: block start (a multiple of the block size), the lanes [lo, hi) of the
# block that belong to the group, the group's shift, then per direction: kh, kw, offset of lane 0 in the flat
# kernel buffer (may point before the group for a straddling block: those lanes are masked), tap stride (C_g).
# 12 columns (``_block_info`` reads them).


def _group_offsets(sizes, ksizes) -> List[List[int]]:
    """Offset of each (direction, group) kernel in the flat kernel buffer (kernels concatenated in order)."""
    out, off = [], 0
    for d in range(len(_DIRECTIONS)):
        row = []
        for (kh, kw), c in zip(ksizes[d], sizes):
            row.append(off)
            off += c * kh * kw
        out.append(row)
    return out


@functools.lru_cache(maxsize=None)
def _block_rows(sizes: Tuple[int, ...], ksizes: Tuple[Tuple[Tuple[int, int], ...], ...], shifts: Tuple[int, ...],
                block_c: int) -> Tuple[Tuple[int, ...], ...]:
    group_off = _group_offsets(sizes, ksizes)
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    rows = []
    for b0, g, lo, hi in _rows_for(sizes, block_c):
        row = [b0, lo, hi, shifts[g]]
        for d in range(len(_DIRECTIONS)):
            kh, kw = ksizes[d][g]
            row += [kh, kw, group_off[d][g] + b0 - starts[g], sizes[g]]
        rows.append(tuple(row))
    return tuple(rows)


# Row-segment path (channels-last, every group's two kernels square and of one size K <= 9: MS-MLP's case): one
# row per run of at most ``block_c`` channels of one group: first channel, channel count, K, shift, then per
# direction the offset of the first channel's tap-0 weight in the flat kernel buffer, and the tap stride (C_g).
_SEG = 7  # output pixels of a row per thread


def _seg_applies(ksizes) -> bool:
    return all(a == b and a[0] == a[1] and a[0] % 2 == 1 and a[0] <= 9 for a, b in zip(*ksizes))


def _seg_block_c(sizes: Sequence[int]) -> int:
    """Channels per program (one per thread): the largest of 64..8 that pads the groups by at most 25%."""
    for bc in (64, 32, 16, 8):
        if sum(-(-c // bc) * bc for c in sizes) <= 1.25 * sum(sizes):
            return bc
    return 8


@functools.lru_cache(maxsize=None)
def _seg_rows(sizes: Tuple[int, ...], ksizes, shifts: Tuple[int, ...], block_c: int) -> Tuple[Tuple[int, ...], ...]:
    rows, gs, offs = [], 0, _group_offsets(sizes, ksizes)
    for g, c in enumerate(sizes):
        for c0 in range(0, c, block_c):
            rows.append((gs + c0, min(block_c, c - c0), ksizes[0][g][0], shifts[g], offs[0][g] + c0,
                         offs[1][g] + c0, c))
        gs += c
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def _tap_major_index(sizes, ksizes, shifts) -> Tuple[int, ...]:
    """Position in the natural flat layout (kernels concatenated as (C_g, kh*kw)) of each tap-major element."""
    index, off = [], 0
    for d in range(len(_DIRECTIONS)):
        for (kh, kw), c in zip(ksizes[d], sizes):
            index += [off + ch * kh * kw + t for t in range(kh * kw) for ch in range(c)]
            off += c * kh * kw
    return tuple(index)


_DEVICE_CACHE = {}  # device copies of the tables above (one small host-to-device copy per configuration)


def _block_table(key, block_c: int, device: torch.device, seg: bool) -> torch.Tensor:
    rows = _seg_rows if seg else _block_rows
    if torch.compiler.is_compiling():  # traced: the table becomes a constant of the graph
        return torch.tensor(rows(*key, block_c), dtype=torch.int32, device=device)
    k = ("rows", key, block_c, seg, device)
    if k not in _DEVICE_CACHE:
        _DEVICE_CACHE[k] = torch.tensor(rows(*key, block_c), dtype=torch.int32, device=device)
    return _DEVICE_CACHE[k]


def _tap_index(key, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.tensor(_tap_major_index(*key), dtype=torch.int64, device=device)
    k = ("taps", key, device)
    if k not in _DEVICE_CACHE:
        _DEVICE_CACHE[k] = torch.tensor(_tap_major_index(*key), dtype=torch.int64, device=device)
    return _DEVICE_CACHE[k]


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    from .dwconv import _jit_source

    @triton.jit
    def _conv_taps(acc, x_blk, Wt, woff, cg, cl, rb, cb, rs, cs, H, W, sxh, sxw, kh, kw, FLIP: tl.constexpr,
                   cmask=None, MASKED: tl.constexpr = False):
        """acc[p, c] += sum_{i,j} w[c, i, j] * x[(rb+i-kh//2 - rs) mod H, (cb+j-kw//2 - cs) mod W], the taps whose
        unwrapped position (rb+i-kh//2, cb+j-kw//2) lies outside the image being zero (padding after the roll).
        ``x_blk`` points at the block's channels of one image; weights are tap-major (tap stride ``cg``)."""
        ph = kh // 2
        pw = kw // 2
        for i in range(kh):
            tr = rb + (i - ph)
            rmask = (tr >= 0) & (tr < H)
            r = tr - rs
            r = tl.where(r < 0, r + H, r)
            for j in range(kw):
                tc = cb + (j - pw)
                m = rmask & (tc >= 0) & (tc < W)
                c = tc - cs
                c = tl.where(c < 0, c + W, c)
                if FLIP:
                    tap = (kh - 1 - i) * kw + (kw - 1 - j)
                else:
                    tap = i * kw + j
                if MASKED:  # a block straddling a group boundary: only lanes [lo, hi) are this group's
                    xv = tl.load(x_blk + (r * sxh + c * sxw)[:, None], mask=m[:, None] & cmask[None, :], other=0.0)
                    wv = tl.load(Wt + woff + tap * cg + cl, mask=cmask, other=0.0)
                else:
                    xv = tl.load(x_blk + (r * sxh + c * sxw)[:, None], mask=m[:, None], other=0.0)
                    wv = tl.load(Wt + woff + tap * cg + cl)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _conv_taps_k(acc, x_blk, Wt, woff, cg, cl, rb, cb, rs, cs, H, W, sxh, sxw, K: tl.constexpr,
                     FLIP: tl.constexpr):
        """``_conv_taps`` for a K x K kernel known at compile time: each row of taps unrolled."""
        for i in range(K):
            tr = rb + (i - K // 2)
            rmask = (tr >= 0) & (tr < H)
            r = tr - rs
            r = tl.where(r < 0, r + H, r)
            for j in tl.static_range(K):
                tc = cb + (j - K // 2)
                m = rmask & (tc >= 0) & (tc < W)
                c = tc - cs
                c = tl.where(c < 0, c + W, c)
                xv = tl.load(x_blk + (r * sxh + c * sxw)[:, None], mask=m[:, None], other=0.0)
                if FLIP:
                    wv = tl.load(Wt + woff + (K * K - 1 - i * K - j) * cg + cl)
                else:
                    wv = tl.load(Wt + woff + (i * K + j) * cg + cl)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _conv_dir(acc, x_blk, Wt, woff, cg, cl, rb, cb, rs, cs, H, W, sxh, sxw, kh, kw, FLIP: tl.constexpr):
        """One direction's taps: unrolled code for the square kernels MS-MLP uses (1, 3, 5, 7), else a loop."""
        if (kh == 7) & (kw == 7):
            acc = _conv_taps_k(acc, x_blk, Wt, woff, cg, cl, rb, cb, rs, cs, H, W, sxh, sxw, 7, FLIP)
        elif (kh == 5) & (kw == 5):
            acc = _conv_taps_k(acc, x_blk, Wt, woff, cg, cl, rb, cb, rs, cs, H, W, sxh, sxw, 5, FLIP)
        elif (kh == 3) & (kw == 3):
            acc = _conv_taps_k(acc, x_blk, Wt, woff, cg, cl, rb, cb, rs, cs, H, W, sxh, sxw, 3, FLIP)
        elif (kh == 1) & (kw == 1):
            acc = _conv_taps_k(acc, x_blk, Wt, woff, cg, cl, rb, cb, rs, cs, H, W, sxh, sxw, 1, FLIP)
        else:
            acc = _conv_taps(acc, x_blk, Wt, woff, cg, cl, rb, cb, rs, cs, H, W, sxh, sxw, kh, kw, FLIP)
        return acc

    @triton.jit
    def _wgrad_walk(X, GY, GW, woff, cg, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
                    kh, kw, TD: tl.constexpr, KKP: tl.constexpr, UNROLL: tl.constexpr, MASKED: tl.constexpr):
        """Weight gradient of one direction, tap-stationary: a (KKP >= kh*kw taps, channels) fp32 accumulator while
        the program walks output rows r0..r1 (across images) pixel by pixel, loading the grad vector and the
        input patch (forward indexing: roll along W, or along H if TD), so the sum over pixels never crosses
        threads; one atomic add per (tap, channel) at the end. MASKED: only lanes in ``cmask`` (see _conv_taps)."""
        t = tl.arange(0, KKP)
        tmask = t < kh * kw
        di = t // kw - kh // 2
        dj = t % kw - kw // 2
        acc = tl.zeros((KKP, cl.shape[0]), dtype=tl.float32)
        x_c = X + cl * sxc
        g_c = GY + cl * sgc
        for rr in range(r0, r1):
            b = rr // H
            h = rr - b * H
            hh = h + di
            rmask = tmask & (hh >= 0) & (hh < H)
            row = hh
            if TD:
                row = hh - sh
                row = tl.where(row < 0, row + H, row)
            x_row = (x_c + b.to(tl.int64) * sxb)[None, :] + (row * sxh)[:, None]
            g_row = g_c + b.to(tl.int64) * sgb + h * sgh
            for w0 in range(0, W, UNROLL):  # UNROLL independent pixels per step keep several loads in flight
                for u in tl.static_range(UNROLL):
                    w = w0 + u
                    if MASKED:
                        g = tl.load(g_row + w * sgw, mask=cmask & ((cl * 0 + w) < W), other=0.0)
                    else:
                        g = tl.load(g_row + w * sgw, mask=(cl * 0 + w) < W, other=0.0)
                    ww = w + dj
                    m = rmask & (ww >= 0) & (ww < W) & ((t * 0 + w) < W)
                    col = ww
                    if not TD:
                        col = ww - sw
                        col = tl.where(col < 0, col + W, col)
                    if MASKED:
                        xv = tl.load(x_row + (col * sxw)[:, None], mask=m[:, None] & cmask[None, :], other=0.0)
                    else:
                        xv = tl.load(x_row + (col * sxw)[:, None], mask=m[:, None], other=0.0)
                    acc += xv.to(tl.float32) * g.to(tl.float32)[None, :]
        tl.atomic_add(GW + woff + t[:, None] * cg + cl[None, :], acc, mask=tmask[:, None] & cmask[None, :])

    @triton.jit
    def _wgrad_dir(X, GY, GW, woff, cg, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
                   kh, kw, TD: tl.constexpr, KKP_MAX: tl.constexpr, UNROLL: tl.constexpr, MASKED: tl.constexpr):
        """The accumulator sized to the kernel: 1, 16, 32 taps where they suffice, else the largest kernel's."""
        if kh * kw == 1:
            _wgrad_walk(X, GY, GW, woff, cg, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
                        kh, kw, TD, 1, UNROLL, MASKED)
        elif kh * kw <= 16:
            _wgrad_walk(X, GY, GW, woff, cg, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
                        kh, kw, TD, 16, UNROLL, MASKED)
        elif kh * kw <= 32:
            _wgrad_walk(X, GY, GW, woff, cg, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
                        kh, kw, TD, 32, UNROLL, MASKED)
        else:
            _wgrad_walk(X, GY, GW, woff, cg, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
                        kh, kw, TD, KKP_MAX, UNROLL, MASKED)

    @triton.jit
    def _block_info(Table, pid_e, H, W):
        t = Table + pid_e * 12
        s = tl.load(t + 3)
        sw = ((s % W) + W) % W  # shift as a non-negative offset (torch.roll semantics: roll by s == by s mod W)
        sh = ((s % H) + H) % H
        return (tl.load(t), tl.load(t + 1), tl.load(t + 2), sw, sh, tl.load(t + 4), tl.load(t + 5), tl.load(t + 6),
                tl.load(t + 7), tl.load(t + 8), tl.load(t + 9), tl.load(t + 10), tl.load(t + 11))

    @triton.jit
    def _mix_shift_kernel(X, Wt, Bias, Y, Table, C, H, W, sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                          BWD: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """Forward (BWD=False): y = sum_d conv_d(roll_d(x)) + biases. Input gradient (BWD=True, X = grad_out):
        y = sum_d roll_d^-1(conv_d^T(x)), i.e. flipped kernels with the shift applied to the output index.
        Overlapping blocks (see ``_block_c``) write identical values to the channels they share."""
        pid_s, pid_e, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tiles_w = tl.cdiv(W, BLOCK_W)
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        oh = (pid_s // tiles_w) * BLOCK_H + p // BLOCK_W
        ow = (pid_s % tiles_w) * BLOCK_W + p % BLOCK_W
        c0, lo, hi, sw, sh, kh_lr, kw_lr, wo_lr, cg_lr, kh_td, kw_td, wo_td, cg_td = _block_info(Table, pid_e, H, W)
        cl = tl.arange(0, BLOCK_C)
        oc = tl.multiple_of(c0, BLOCK_C) + cl  # aligned block start: 16-byte loads over channels-last channels
        cmask = (cl >= lo) & (cl < hi)
        x_blk = (X + pid_b.to(tl.int64) * sxb + oc * sxc)[None, :]
        acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
        pmask = (oh < H) & (ow < W)
        y_ptr = Y + pid_b.to(tl.int64) * syb + oc[None, :] * syc + (oh * syh + ow * syw)[:, None]
        if BWD:
            uw = ow + sw
            uw = tl.where(uw >= W, uw - W, uw)
            uh = oh + sh
            uh = tl.where(uh >= H, uh - H, uh)
        if (lo == 0) & (hi == BLOCK_C):  # the whole block is one group's: unmasked, vectorisable loads
            if BWD:
                acc = _conv_dir(acc, x_blk, Wt, wo_lr, cg_lr, cl, oh, uw, 0, 0, H, W, sxh, sxw, kh_lr, kw_lr, True)
                acc = _conv_dir(acc, x_blk, Wt, wo_td, cg_td, cl, uh, ow, 0, 0, H, W, sxh, sxw, kh_td, kw_td, True)
            else:
                acc = _conv_dir(acc, x_blk, Wt, wo_lr, cg_lr, cl, oh, ow, 0, sw, H, W, sxh, sxw, kh_lr, kw_lr, False)
                acc = _conv_dir(acc, x_blk, Wt, wo_td, cg_td, cl, oh, ow, sh, 0, H, W, sxh, sxw, kh_td, kw_td, False)
            if HAS_BIAS:
                acc += (tl.load(Bias + oc).to(tl.float32) + tl.load(Bias + C + oc).to(tl.float32))[None, :]
            tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=pmask[:, None])
        else:  # a block straddling a group boundary: this group's lanes only
            if BWD:
                acc = _conv_taps(acc, x_blk, Wt, wo_lr, cg_lr, cl, oh, uw, 0, 0, H, W, sxh, sxw, kh_lr, kw_lr, True,
                                 cmask, True)
                acc = _conv_taps(acc, x_blk, Wt, wo_td, cg_td, cl, uh, ow, 0, 0, H, W, sxh, sxw, kh_td, kw_td, True,
                                 cmask, True)
            else:
                acc = _conv_taps(acc, x_blk, Wt, wo_lr, cg_lr, cl, oh, ow, 0, sw, H, W, sxh, sxw, kh_lr, kw_lr, False,
                                 cmask, True)
                acc = _conv_taps(acc, x_blk, Wt, wo_td, cg_td, cl, oh, ow, sh, 0, H, W, sxh, sxw, kh_td, kw_td, False,
                                 cmask, True)
            if HAS_BIAS:
                bias = tl.load(Bias + oc, mask=cmask, other=0.0).to(tl.float32)
                acc += (bias + tl.load(Bias + C + oc, mask=cmask, other=0.0).to(tl.float32))[None, :]
            tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])

    @triton.jit
    def _mix_shift_wgrad_kernel(X, GY, GW, Table, B, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, ROWS_PER_PROG,
                                BLOCK_C: tl.constexpr, KKP_MAX: tl.constexpr, UNROLL: tl.constexpr):
        """Both directions' weight gradients for one channel block over a run of output rows (see _wgrad_walk)."""
        pid_r, pid_e = tl.program_id(0), tl.program_id(1)
        c0, lo, hi, sw, sh, kh_lr, kw_lr, wo_lr, cg_lr, kh_td, kw_td, wo_td, cg_td = _block_info(Table, pid_e, H, W)
        c0 = tl.multiple_of(c0, BLOCK_C)
        cl = tl.arange(0, BLOCK_C)
        cmask = (cl >= lo) & (cl < hi)
        r0 = pid_r * ROWS_PER_PROG
        r1 = tl.minimum(r0 + ROWS_PER_PROG, B * H)
        Xc, Gc = X + c0 * sxc, GY + c0 * sgc
        if (lo == 0) & (hi == BLOCK_C):
            _wgrad_dir(Xc, Gc, GW, wo_lr, cg_lr, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh,
                       sgw, kh_lr, kw_lr, False, KKP_MAX, UNROLL, False)
            _wgrad_dir(Xc, Gc, GW, wo_td, cg_td, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh,
                       sgw, kh_td, kw_td, True, KKP_MAX, UNROLL, False)
        else:
            _wgrad_dir(Xc, Gc, GW, wo_lr, cg_lr, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh,
                       sgw, kh_lr, kw_lr, False, KKP_MAX, UNROLL, True)
            _wgrad_dir(Xc, Gc, GW, wo_td, cg_td, cl, cmask, r0, r1, sh, sw, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh,
                       sgw, kh_td, kw_td, True, KKP_MAX, UNROLL, True)

    # ---- row-segment kernels (generated source; see _seg_body) --------------------------------------------------
    # forward / input-gradient passes: grid (segment blocks, table rows, images); the weight gradient: grid (runs of
    # segment blocks, table rows, kernel rows), GY = the output gradient, Part = per-run sums (NW = kernel buffer size)
    _SEG_SIGNATURES = {
        "conv": "X, Wt, Bias, Y, Rows, C, H, W, NS, sxb, sxh, sxw, syb, syh, syw, HAS_BIAS: tl.constexpr",
        "wgrad": "X, Wt, GY, Part, Rows, NW, H, W, NS, M, ITERS, sxb, sxh, sxw, sgb, sgh, sgw"}
    _SEG_HEAD = '''
def {name}({signature}, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, pid_r, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = Rows + pid_r * 7
    c0 = tl.load(row)
    n = tl.load(row + 1)
    K = tl.load(row + 2)
    s = tl.load(row + 3)
    w_lr = tl.load(row + 4)
    w_td = tl.load(row + 5)
    cg = tl.load(row + 6)
    sw = ((s % W) + W) % W  # torch.roll by s == by s mod W
    sh = ((s % H) + H) % H
    cl = tl.arange(0, BLOCK_C)
    cmask = (cl < n)[None, :]
    wl = Wt + w_lr + cl
    wt = Wt + w_td + cl
{body}
'''

    def _seg_pixels(lines, indent, mode, hk, nq):
        """Per-thread column offsets and masks of the ``nq`` input columns a segment meets (see _seg_body)."""
        for q in range(nq):
            lines.append(f"{indent}col{q} = base + {q - hk}")
            lines.append(f"{indent}cm{q} = ((col{q} >= 0) & (col{q} < W))[:, None]")
            lines.append(f"{indent}xt{q} = (col{q} * sxw)[:, None]")
            if mode in ("fwd", "wgrad"):  # the lr direction reads the input rolled along W
                lines.append(f"{indent}lc{q} = col{q} - sw")
                lines.append(f"{indent}xl{q} = (tl.where(lc{q} < 0, lc{q} + W, lc{q}) * sxw)[:, None]")

    def _seg_body(k: int, mode: str) -> List[str]:
        """Code for one kernel size ``k`` (each program's group has one). A thread owns ``_SEG`` consecutive output
        pixels of one row (``base + p``) and one channel; per kernel row it loads the ``_SEG + k - 1`` input values
        those pixels meet once and feeds each into up to k accumulators (weights of the row loaded once).

        fwd:    both directions, y[o, base+p] = sum_d conv_d(roll_d(x)): "lr" reads columns (col - sw) mod W,
                "td" rows (r - sh) mod H; the padding is tested on the unrolled coordinates.
        bwd_td: td's input gradient, the flipped conv of grad centred on row (o + sh) mod H (writes gx).
        bwd_lr: lr's input gradient in centre space: the flipped conv of grad at centres base+p, added into
                gx[o, (base + p - sw) mod W] (after bwd_td).
        wgrad:  one kernel row ``i`` per program (grid axis 2), both directions: acc_d[j] += g[o, base+p] *
                x_d[o + i - hk, base + p + j - hk] over ITERS blocks of segments; per-run partial sums."""
        hk, nq, L = (k - 1) // 2, _SEG + k - 1, []
        add = L.append
        if mode == "wgrad":
            add("        if i < K:")
            for d in ("lr", "td"):
                for j in range(k):
                    add(f"            a{d}{j} = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)")
            add("            for it in range(ITERS):")
            ind = " " * 16
            add(f"{ind}m = (pid_m * ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)")
            add(f"{ind}b = (m // (H * NS)).to(tl.int64)")
            add(f"{ind}o = (m // NS) % H")
            add(f"{ind}base = (m % NS) * {_SEG}")
            add(f"{ind}ov = (m < M)[:, None] & cmask")
            _seg_pixels(L, ind, mode, hk, nq)
            add(f"{ind}r = o + (i - {hk})")
            add(f"{ind}rv = ((r >= 0) & (r < H))[:, None] & ov")
            add(f"{ind}rt = r - sh")
            add(f"{ind}rt = tl.where(rt < 0, rt + H, rt)")
            add(f"{ind}gr = GY + (b * sgb + o * sgh)[:, None] + (c0 + cl)[None, :]")
            for p in range(_SEG):
                add(f"{ind}g{p} = tl.load(gr + (col{p + hk} * sgw)[:, None], mask=ov & cm{p + hk}, other=0.0)"
                    ".to(tl.float32)")
            for d, rname, xo in (("lr", "r", "xl"), ("td", "rt", "xt")):
                add(f"{ind}xr = X + (b * sxb + {rname} * sxh)[:, None] + (c0 + cl)[None, :]")
                for q in range(nq):
                    add(f"{ind}xv = tl.load(xr + {xo}{q}, mask=rv & cm{q}, other=0.0).to(tl.float32)")
                    for p in seg_outputs(q, k, _SEG):
                        add(f"{ind}a{d}{q - p} += g{p} * xv")
            add("            out = Part + pid_m.to(tl.int64) * NW + cl  # this run's partial sums")
            for d, wo in (("lr", "w_lr"), ("td", "w_td")):
                for j in range(k):
                    add(f"            tl.store(out + {wo} + (i * {k} + {j}) * cg, tl.sum(a{d}{j}, axis=0), "
                        "mask=cl < n)")
            return L
        ind = " " * 8
        add(f"{ind}m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)")
        add(f"{ind}o = m // NS")
        add(f"{ind}base = (m % NS) * {_SEG}")
        add(f"{ind}ov = (o < H)[:, None] & cmask")
        add(f"{ind}xb = X + pid_z.to(tl.int64) * sxb + (c0 + cl)[None, :]")
        _seg_pixels(L, ind, mode, hk, nq)
        for p in range(_SEG):
            add(f"{ind}acc{p} = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)")
        if mode == "bwd_td":
            add(f"{ind}ctr = o + sh")
            add(f"{ind}ctr = tl.where(ctr >= H, ctr - H, ctr)")
        else:
            add(f"{ind}ctr = o")
        add(f"{ind}for i in range({k}):")
        add(f"{ind}    r = ctr + (i - {hk})")
        add(f"{ind}    rv = ((r >= 0) & (r < H))[:, None] & ov")
        if mode == "fwd":
            add(f"{ind}    rt = r - sh")
            add(f"{ind}    rt = tl.where(rt < 0, rt + H, rt)")
            terms = (("wl", "r", "xl"), ("wt", "rt", "xt"))
        else:
            terms = (("wt" if mode == "bwd_td" else "wl", "r", "xt"),)
        flip = mode != "fwd"
        for wname, rname, xo in terms:
            add(f"{ind}    wr = {wname} + ({k - 1} - i) * {k} * cg" if flip else f"{ind}    wr = {wname} + i * {k} * cg")
            for j in range(k):
                add(f"{ind}    w{j} = tl.load(wr + {k - 1 - j if flip else j} * cg, mask=cl < n, other=0.0)"
                    ".to(tl.float32)[None, :]")
            add(f"{ind}    xr = xb + ({rname} * sxh)[:, None]")
            for q in range(nq):
                add(f"{ind}    xv = tl.load(xr + {xo}{q}, mask=rv & cm{q}, other=0.0).to(tl.float32)")
                for p in seg_outputs(q, k, _SEG):
                    add(f"{ind}    acc{p} += xv * w{q - p}")
        if mode == "fwd":
            add(f"{ind}if HAS_BIAS:")
            add(f"{ind}    bias = (tl.load(Bias + c0 + cl, mask=cl < n, other=0.0).to(tl.float32) + "
                "tl.load(Bias + C + c0 + cl, mask=cl < n, other=0.0).to(tl.float32))[None, :]")
            add(f"{ind}else:")
            add(f"{ind}    bias = tl.zeros((1, BLOCK_C), dtype=tl.float32)")
        add(f"{ind}yb = Y + pid_z.to(tl.int64) * syb + (c0 + cl)[None, :] + (o * syh)[:, None]")
        if mode == "bwd_lr":  # all loads of td's gradient before the stores (they could alias as far as the
            for p in range(_SEG):  # compiler knows: interleaved, each load would wait for the previous store)
                add(f"{ind}oc = col{p + hk} - sw")
                add(f"{ind}yp{p} = yb + (tl.where(oc < 0, oc + W, oc) * syw)[:, None]")
                add(f"{ind}acc{p} += tl.load(yp{p}, mask=ov & cm{p + hk}, other=0.0).to(tl.float32)")
        for p in range(_SEG):
            c, mask = f"col{p + hk}", f"ov & cm{p + hk}"
            ptr = f"yp{p}" if mode == "bwd_lr" else f"yb + ({c} * syw)[:, None]"
            val = f"acc{p} + bias" if mode == "fwd" else f"acc{p}"
            add(f"{ind}tl.store({ptr}, ({val}).to(Y.dtype.element_ty), mask={mask})")
        return L

    @functools.lru_cache(maxsize=None)
    def _seg_kernel(ks: Tuple[int, ...], mode: str):
        """The row-segment kernel of ``mode`` for a configuration whose groups use the kernel sizes ``ks``: one
        branch per size (a program's group has one). ``wgrad`` takes the kernel row as grid axis 2 (``i``)."""
        body = ["    i = pid_z"] if mode == "wgrad" else []
        for n, k in enumerate(sorted(set(ks), reverse=True)):
            body.append(f"    {'if' if n == 0 else 'elif'} K == {k}:")
            body += _seg_body(k, mode)
        name = f"mix_shift_seg_{mode}"
        src = _SEG_HEAD.format(name=name, signature=_SEG_SIGNATURES["wgrad" if mode == "wgrad" else "conv"],
                               body="\n".join(body))
        return _jit_source(src, f"<metamixer {name} k{'-'.join(map(str, sorted(set(ks))))}>", name)

    def _seg_geometry(x: torch.Tensor, block_c: int, nw: Optional[int] = None) -> Tuple[int, int, int, int]:
        """(segments per row, segments per image, BLOCK_M, num_warps): one (segment, channel) pair per thread."""
        H, W = x.shape[2:]
        ns = triton.cdiv(W, _SEG)
        nw = nw or (4 if H * ns * block_c >= 256 else 2)
        return ns, H * ns, max(1, 32 * nw // block_c), nw

    def _launch_seg(x, y, wflat, bflat, table, block_c, ks, mode):
        B, C, H, W = x.shape
        ns, m, bm, nw = _seg_geometry(x, block_c)
        _seg_kernel(ks, mode)[(triton.cdiv(m, bm), table.shape[0], B)](
            x, wflat, bflat if bflat is not None else wflat, y, table, C, H, W, ns, *_strides(x), *_strides(y),
            HAS_BIAS=bflat is not None, BLOCK_M=bm, BLOCK_C=block_c, num_warps=nw)
        return y

    def _seg_wgrad(x, grad, wflat, table, block_c, ks):
        """Both directions' kernel gradients (flat layout of ``wflat``) from per-run fp32 partial sums."""
        B, C, H, W = x.shape
        ns, m, bm, nw = _seg_geometry(x, block_c, 8)  # 8 warps: 10-25% faster than 4 at msmlp_t's stages (H100)
        m_total, kmax = B * m, max(ks)
        blocks = triton.cdiv(m_total, bm)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        runs = max(1, min(blocks, 8 * sms // (table.shape[0] * kmax)))  # ~8 programs per SM
        iters = triton.cdiv(blocks, runs)
        runs = triton.cdiv(blocks, iters)
        part = torch.empty(runs, wflat.numel(), device=x.device, dtype=torch.float32)
        _seg_kernel(ks, "wgrad")[(runs, table.shape[0], kmax)](
            x, wflat, grad, part, table, wflat.numel(), H, W, ns, m_total, iters, *_strides(x), *_strides(grad),
            BLOCK_M=bm, BLOCK_C=block_c, num_warps=nw)
        return part.sum(0).to(wflat.dtype)

    def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
        return t.stride(0), t.stride(2), t.stride(3)

    # (elements per program, warps) per pass and layout
    _CFG = {("fwd", True): (2048, 4), ("fwd", False): (1024, 4)}

    def _tiles(x: torch.Tensor, block_c: int, kind: str) -> Tuple[int, int, int]:
        H, W = x.shape[2:]
        cl = x.stride(1) == 1 and x.shape[1] > 1  # channels-last: vectorise over channels, else along W
        elems, warps = _CFG[(kind, cl)]
        bw = min(8 if cl else 32, triton.next_power_of_2(W))
        bh = max(1, min(elems // (block_c * bw), triton.next_power_of_2(H)))
        return bh, bw, warps

    def _launch(x: torch.Tensor, like: torch.Tensor, wflat: torch.Tensor, bflat: Optional[torch.Tensor],
                table: torch.Tensor, block_c: int, bwd: bool) -> torch.Tensor:
        B, C, H, W = x.shape
        y = torch.empty_like(like)
        bh, bw, warps = _tiles(like, block_c, "fwd")
        grid = (triton.cdiv(H, bh) * triton.cdiv(W, bw), table.shape[0], B)
        _mix_shift_kernel[grid](x, wflat, bflat if bflat is not None else wflat, y, table, C, H, W,
                                *x.stride(), *y.stride(), BWD=bwd, HAS_BIAS=bflat is not None,
                                BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=block_c, num_warps=warps)
        return y

    _WGRAD_UNROLL = 4

    def _fwd_impl(x, wflat, bflat, table, block_c, seg_ks):
        if seg_ks:
            return _launch_seg(x, torch.empty_like(x), wflat, bflat, table, block_c, tuple(seg_ks), "fwd")
        return _launch(x, x, wflat, bflat, table, block_c, bwd=False)

    def _bwd_impl(grad, x, wflat, table, block_c, kk_max, seg_ks, need_x, need_w):
        ks = tuple(seg_ks)
        gx, gw = x.new_empty(0), wflat.new_empty(0)
        if ks and grad.stride(1) != 1:  # the row-segment kernels read channels as the unit-stride dimension
            grad = grad.contiguous(memory_format=torch.channels_last)
        if need_x and ks:  # td's gradient, then lr's added in place (see _seg_body)
            gx = _launch_seg(grad, torch.empty_like(x), wflat, None, table, block_c, ks, "bwd_td")
            _launch_seg(grad, gx, wflat, None, table, block_c, ks, "bwd_lr")
        elif need_x:
            gx = _launch(grad, x, wflat, None, table, block_c, bwd=True)
        if need_w and ks:
            gw = _seg_wgrad(x, grad, wflat, table, block_c, ks)
        elif need_w:
            B, C, H, W = x.shape
            acc = torch.zeros(wflat.shape, device=x.device, dtype=torch.float32)
            kkp = triton.next_power_of_2(kk_max)
            blocks = table.shape[0]
            # many short runs of rows (occupancy hides the walk's load latency), few atomics per (tap, channel)
            target = 32 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1)
            per = triton.cdiv(B * H, max(1, min(B * H, target // blocks)))
            grid = (triton.cdiv(B * H, per), blocks)
            _mix_shift_wgrad_kernel[grid](x, grad, acc, table, B, H, W, *x.stride(), *grad.stride(), per,
                                          BLOCK_C=block_c, KKP_MAX=kkp, UNROLL=_WGRAD_UNROLL,
                                          num_warps=max(1, min(8, kkp * block_c // 256)))
            gw = acc.to(wflat.dtype)
        return gx, gw

    def _bias_grad(grad):
        gsum = grad.sum((0, 2, 3), dtype=torch.float32).to(grad.dtype)
        return torch.cat([gsum, gsum])  # each direction's bias gets the same gradient

    def _save(ctx, x, wflat, bflat, table, block_c, kk_max, seg_ks):
        ctx.save_for_backward(x, wflat, table)
        ctx.cfg, ctx.has_bias = (block_c, kk_max, seg_ks), bflat is not None

    def _grads(bwd, ctx, grad):
        x, wflat, table = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gw = bwd(grad, x, wflat, table, *ctx.cfg, need_x, need_w)
        gb = _bias_grad(grad) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (gx if need_x else None), (gw if need_w else None), gb, None, None, None, None

    class _MixShiftFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, wflat, bflat, table, block_c, kk_max, seg_ks):
            _save(ctx, x, wflat, bflat, table, block_c, kk_max, seg_ks)
            return _fwd_impl(x, wflat, bflat, table, block_c, seg_ks)

        @staticmethod
        def backward(ctx, grad):
            return _grads(_bwd_impl, ctx, grad)

    @torch.library.custom_op("metamixer::mix_shift", mutates_args=())
    def _mix_shift_op(x: torch.Tensor, wflat: torch.Tensor, bflat: Optional[torch.Tensor], table: torch.Tensor,
                      block_c: int, kk_max: int, seg_ks: List[int]) -> torch.Tensor:
        return _fwd_impl(x, wflat, bflat, table, block_c, seg_ks)

    @_mix_shift_op.register_fake
    def _(x, wflat, bflat, table, block_c, kk_max, seg_ks):
        return torch.empty_like(x)

    @torch.library.custom_op("metamixer::mix_shift_backward", mutates_args=())
    def _mix_shift_bwd_op(grad: torch.Tensor, x: torch.Tensor, wflat: torch.Tensor, table: torch.Tensor,
                          block_c: int, kk_max: int, seg_ks: List[int], need_x: bool,
                          need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        return _bwd_impl(grad, x, wflat, table, block_c, kk_max, seg_ks, need_x, need_w)

    @_mix_shift_bwd_op.register_fake
    def _(grad, x, wflat, table, block_c, kk_max, seg_ks, need_x, need_w):
        return (torch.empty_like(x) if need_x else x.new_empty(0),
                torch.empty_like(wflat) if need_w else wflat.new_empty(0))

    def _setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    def _backward(ctx, grad):
        return _grads(torch.ops.metamixer.mix_shift_backward, ctx, grad)

    _mix_shift_op.register_autograd(_backward, setup_context=_setup_context)

register_op("mix_shift", mix_shift)
