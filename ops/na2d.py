"""2-D neighborhood attention ops with NATTEN 0.17 semantics (the unfused ``na2d_qk`` / ``na2d_av``).

OverLoCK's ContMix aggregates values over a k x k neighbourhood with per-pixel weights through NATTEN's
``na2d_av``; NATTEN >= 0.20 no longer ships it, so it is defined here in plain PyTorch.

Layout (NATTEN <= 0.17 unfused ops): query / key / value ``[B, heads, H, W, D]``, attention ``[B, heads, H, W, k*k]``
with tap ``a*k + c`` = row offset ``a``, column offset ``c``; output like ``value``. Non-causal, odd square kernel.

Window rule (NATTEN ``get_window_start``, non-causal), per axis of length ``L``, kernel ``k``, ``nb = k // 2``,
dilation ``d``: pixel ``i`` belongs to dilation group ``g = i % d`` at index ``ip = i // d`` of a group holding
``Lp = len(range(g, L, d))`` pixels, and its neighbours along the axis are ``s(i) + a*d`` for ``a < k`` with::

    s(i) = clamp(ip - nb, 0, Lp - k) * d + g

i.e. the window is centred where possible and SHIFTED to stay inside the image (inside its dilation group) at the
borders; it is never zero-padded and always has exactly ``k`` taps. This needs ``k * d <= L`` (as in NATTEN).

    na2d_qk: attn[b,h,i,j,a*k+c] = sum_D query[b,h,i,j,:] * key[b,h, s(i)+a*d, s(j)+c*d, :]  (+ rpb bias)
    na2d_av: out[b,h,i,j,:]      = sum_{a,c} attn[b,h,i,j,a*k+c] * value[b,h, s(i)+a*d, s(j)+c*d, :]

Relative-position bias (NATTEN ``get_pb_start``): ``rpb`` is ``[heads, 2k-1, 2k-1]``; tap ``(a, c)`` of pixel
``(i, j)`` reads ``rpb[h, p(i)+a, p(j)+c]`` where ``p(i) = (k-1) - (i - s(i)) // d``, i.e. the bias depends only on
the offset (in dilated steps) between neighbour and pixel. For ``d = 1`` this is ``k-1-i`` near the start,
``L-1-i`` near the end and ``k//2`` in the interior. :func:`na2d_rpb` returns the bias as ``[heads, H, W, k*k]``
(OverLoCK adds it to its own dynamic-kernel logits, ``na2d_qk(..., rpb=)`` adds it to q.k).

Triton path (``impl='triton'``, or ``auto`` on CUDA; float64 always takes the reference): any B/heads/H/W/D, odd
kernel, any dilation (``k * d <= H, W``), fp32/fp16/bf16 with fp32 accumulation, any input strides (OverLoCK's
permuted value views, split attention slices). Three kernels, each program owning a 2-D tile of up to 64 pixels of one
(batch, head) and computing the window start per pixel with the clamped formula above:
  * ``dot``:  ``out[p, a*k+c] = A[p] . B[nbr(p, a, c)]`` (+ rpb): the na2d_qk forward and the attn-gradient of na2d_av;
  * ``sum``:  ``out[p] = sum_t Wt[p, t] * B[nbr(p, t)]``: the na2d_av forward and the query-gradient of na2d_qk;
  * ``inverse``: ``out[x] = sum over pixels p whose window holds x of Wt[p, tap(p -> x)] * A[p]``: the key-gradient
    of na2d_qk and the value-gradient of na2d_av, gathered (deterministic, no atomics). Along an axis the pixels
    whose window holds ``x`` form a contiguous run of its dilation group, with closed-form ends (``_inverse_range``).
The rpb gradient is the logits' gradient summed over the batch and scattered with :func:`na2d_rpb`'s index map.
Eager calls run the kernels through ``torch.autograd.Function`` (low per-call overhead); under ``torch.compile``
both ops are registered with ``torch.library.custom_op`` (``metamixer::na2d_qk``, ``metamixer::na2d_av``, helper
``metamixer::na2d_inverse``) with their backward registered, so they run under ``torch.compile`` as opaque ops and
under autocast (operands are cast to the autocast dtype, as ``einsum`` would be).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._dispatch import resolve_impl, triton_available, register_op

__all__ = ["na2d_qk", "na2d_qk_reference", "na2d_av", "na2d_av_reference", "na2d_rpb", "window_start"]


def window_start(length: int, kernel_size: int, dilation: int = 1, device=None) -> torch.Tensor:
    """``s(i)`` for ``i < length`` (int64 ``[length]``): the first neighbour of each pixel along one axis."""
    if kernel_size % 2 != 1:
        raise ValueError(f"neighborhood attention needs an odd kernel_size, got {kernel_size}")
    if kernel_size * dilation > length:
        raise ValueError(f"neighborhood attention needs kernel_size * dilation <= the feature-map size; got "
                         f"kernel_size={kernel_size}, dilation={dilation} for an axis of length {length}")
    i = torch.arange(length, device=device)
    group, ip = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation  # len(range(g, length, dilation))
    start = torch.minimum((ip - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    return start * dilation + group


def _neighbours(length: int, kernel_size: int, dilation: int, device) -> torch.Tensor:
    """Neighbour indices ``[L, k]`` of every pixel along one axis."""
    start = window_start(length, kernel_size, dilation, device)
    return start[:, None] + dilation * torch.arange(kernel_size, device=device)


def na2d_rpb(rpb: torch.Tensor, height: int, width: int, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """Relative-position bias ``rpb [heads, 2k-1, 2k-1]`` laid out like the attention: ``[heads, H, W, k*k]``."""
    k = kernel_size
    if rpb.shape[-2:] != (2 * k - 1, 2 * k - 1):
        raise ValueError(f"rpb must be [heads, {2 * k - 1}, {2 * k - 1}] for kernel_size={k}, got {tuple(rpb.shape)}")
    taps = torch.arange(k, device=rpb.device)
    rows = []
    for length in (height, width):
        start = window_start(length, k, dilation, rpb.device)
        pos = torch.arange(length, device=rpb.device)
        rows.append((k - 1) - (pos - start) // dilation)  # p(i)
    row = (rows[0][:, None] + taps)[:, None, :, None]  # [H, 1, k, 1]
    col = (rows[1][:, None] + taps)[None, :, None, :]  # [1, W, 1, k]
    return rpb[:, row, col].reshape(rpb.shape[0], height, width, k * k)


def _check(x: torch.Tensor, attn_or_key: torch.Tensor, name: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} expects [B, heads, H, W, D] tensors, got shape {tuple(x.shape)}")
    if attn_or_key.shape[:4] != x.shape[:4]:
        raise ValueError(f"{name}: leading dims [B, heads, H, W] differ: {tuple(attn_or_key.shape)} vs {tuple(x.shape)}")


def na2d_qk_reference(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int = 1,
                      rpb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Neighbourhood logits ``[B, heads, H, W, k*k]`` (no scaling applied), optionally plus the RPB bias."""
    _check(query, key, "na2d_qk")
    H, W, k = query.shape[2], query.shape[3], kernel_size
    rows = _neighbours(H, k, dilation, query.device)
    cols = _neighbours(W, k, dilation, query.device)
    taps = []
    for a in range(k):  # one row offset at a time keeps memory at k x the input
        key_a = key[:, :, rows[:, a]][:, :, :, cols]  # [B, heads, H, W, k, D]
        taps.append(torch.einsum("bhijd,bhijcd->bhijc", query, key_a))
    attn = torch.stack(taps, dim=-2).flatten(-2)
    if rpb is not None:
        attn = attn + na2d_rpb(rpb, H, W, k, dilation).to(attn.dtype)
    return attn


def na2d_av_reference(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """Weighted sum of each pixel's k x k neighbours: ``[B, heads, H, W, D]``."""
    _check(value, attn, "na2d_av")
    H, W, k = value.shape[2], value.shape[3], kernel_size
    if attn.shape[-1] != k * k:
        raise ValueError(f"na2d_av: attn has {attn.shape[-1]} taps, expected kernel_size**2 = {k * k}")
    rows = _neighbours(H, k, dilation, value.device)
    cols = _neighbours(W, k, dilation, value.device)
    attn = attn.unflatten(-1, (k, k))
    out = 0
    for a in range(k):
        value_a = value[:, :, rows[:, a]][:, :, :, cols]  # [B, heads, H, W, k, D]
        out = out + torch.einsum("bhijc,bhijcd->bhijd", attn[..., a, :], value_a)
    return out


def _check_window(length: int, kernel_size: int, dilation: int) -> None:
    """The argument checks of :func:`window_start`, without building the index tensor."""
    if kernel_size % 2 != 1:
        raise ValueError(f"neighborhood attention needs an odd kernel_size, got {kernel_size}")
    if kernel_size * dilation > length:
        raise ValueError(f"neighborhood attention needs kernel_size * dilation <= the feature-map size; got "
                         f"kernel_size={kernel_size}, dilation={dilation} for an axis of length {length}")


def _triton_supported(*tensors: torch.Tensor) -> bool:
    return tensors[0].ndim == 5 and all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors)


def _cast(x: torch.Tensor, y: torch.Tensor, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Autocast casts both operands like ``einsum`` would; otherwise their dtypes must agree (as for ``einsum``)."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return x.to(dt), y.to(dt)
    if x.dtype != y.dtype:
        raise TypeError(f"{name}: operand dtypes differ ({x.dtype} vs {y.dtype})")
    return x, y


def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int = 1,
            rpb: Optional[torch.Tensor] = None, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher for :func:`na2d_qk_reference`: the Triton kernels on CUDA (fp32/fp16/bf16), else the reference."""
    per_head_rpb = rpb is None or (rpb.ndim == 3 and rpb.shape[0] == query.shape[1])  # the kernel does not broadcast
    if resolve_impl(impl, query, _triton_supported(query, key) and per_head_rpb,
                    op="na2d_qk", args=(query, key, kernel_size, dilation, rpb)) == "reference":
        return na2d_qk_reference(query, key, kernel_size, dilation, rpb)
    _check(query, key, "na2d_qk")
    if key.shape != query.shape:
        raise ValueError(f"na2d_qk: query and key shapes differ: {tuple(query.shape)} vs {tuple(key.shape)}")
    if rpb is not None and rpb.shape[-2:] != (2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(f"rpb must be [heads, {2 * kernel_size - 1}, {2 * kernel_size - 1}] for "
                         f"kernel_size={kernel_size}, got {tuple(rpb.shape)}")
    for length in query.shape[2:4]:
        _check_window(length, kernel_size, dilation)
    query, key = _cast(query, key, "na2d_qk")
    with torch.autocast(query.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return torch.ops.metamixer.na2d_qk(query, key, rpb, kernel_size, dilation)
        return _QKFunction.apply(query, key, rpb, kernel_size, dilation)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int = 1,
            impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher for :func:`na2d_av_reference`: the Triton kernels on CUDA (fp32/fp16/bf16), else the reference."""
    if resolve_impl(impl, value, _triton_supported(value, attn),
                    op="na2d_av", args=(attn, value, kernel_size, dilation)) == "reference":
        return na2d_av_reference(attn, value, kernel_size, dilation)
    _check(value, attn, "na2d_av")
    if attn.shape[-1] != kernel_size * kernel_size:
        raise ValueError(f"na2d_av: attn has {attn.shape[-1]} taps, expected kernel_size**2 = {kernel_size ** 2}")
    for length in value.shape[2:4]:
        _check_window(length, kernel_size, dilation)
    attn, value = _cast(attn, value, "na2d_av")
    with torch.autocast(value.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return torch.ops.metamixer.na2d_av(attn, value, kernel_size, dilation)
        return _AVFunction.apply(attn, value, kernel_size, dilation)


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _win_start(i, L, K: tl.constexpr, DIL: tl.constexpr):
        """s(i): first neighbour of pixel ``i`` on an axis of length ``L`` (the module doc's clamped formula)."""
        g = i % DIL
        group_len = (L - g + DIL - 1) // DIL
        return tl.minimum(tl.maximum(i // DIL - K // 2, 0), group_len - K) * DIL + g

    @triton.jit
    def _pixel_tile(pid, H, W, BH: tl.constexpr, BW: tl.constexpr):
        """Row/column indices of the BH x BW pixel tile ``pid`` (flattened) and its in-image mask."""
        p = tl.arange(0, BH * BW)
        tiles_w = tl.cdiv(W, BW)
        i = (pid // tiles_w) * BH + p // BW
        j = (pid % tiles_w) * BW + p % BW
        return i, j, (i < H) & (j < W)

    @triton.jit
    def _na2d_dot_kernel(A, Bv, Bias, Out, G, H, W, D,
                         sab, sah, sai, saj, sad, sbb, sbh, sbi, sbj, sbd, sob, soh, soi, soj, sot,
                         K: tl.constexpr, KP: tl.constexpr, DIL: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BH: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr):
        """out[p, a*K+c] = A[p, :] . Bv[s(i)+a*DIL, s(j)+c*DIL, :] (+ bias): na2d_qk, and the attn-gradient of na2d_av.
        One program: a BH x BW tile of pixels of one (batch, head); per kernel row ``a`` the K dot products are
        gathered into a (pixels x KP) tile and stored as one contiguous run of K logits per pixel."""
        pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // G).to(tl.int64)
        h = (pid_bh % G).to(tl.int64)
        i, j, pmask = _pixel_tile(pid_s, H, W, BH, BW)
        d = tl.arange(0, BD)
        c = tl.arange(0, KP)
        m2 = pmask[:, None] & (d < D)[None, :]
        omask = pmask[:, None] & (c < K)[None, :]
        si = _win_start(i, H, K, DIL)
        sj = _win_start(j, W, K, DIL)
        q = tl.load(A + b * sab + h * sah + (i * sai + j * saj)[:, None] + (d * sad)[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        b_bh = Bv + b * sbb + h * sbh
        b_d = (d * sbd)[None, :]
        o_ptr = Out + b * sob + h * soh + (i * soi + j * soj)[:, None] + (c * sot)[None, :]
        if HAS_BIAS:  # rpb[h, p(i) + a, p(j) + c] with p(i) = K-1 - (i - s(i)) / DIL
            R: tl.constexpr = 2 * K - 1
            bias_row = ((K - 1) - (i - si) // DIL) * R + (K - 1) - (j - sj) // DIL
            bias_ptr = Bias + h * R * R + bias_row[:, None] + c[None, :]
        for a in range(K):
            row = (si + a * DIL) * sbi
            s = tl.zeros((BH * BW, KP), dtype=tl.float32)
            for cc in range(K):
                kv = tl.load(b_bh + (row + (sj + cc * DIL) * sbj)[:, None] + b_d, mask=m2, other=0.0).to(tl.float32)
                s = tl.where(c[None, :] == cc, tl.sum(q * kv, axis=1)[:, None], s)
            if HAS_BIAS:
                s += tl.load(bias_ptr + a * R, mask=omask, other=0.0).to(tl.float32)
            tl.store(o_ptr + a * K * sot, s.to(Out.dtype.element_ty), mask=omask)

    @triton.jit
    def _na2d_sum_kernel(Wt, Bv, Out, G, H, W, D,
                         swb, swh, swi, swj, swt, sbb, sbh, sbi, sbj, sbd, sob, soh, soi, soj, sod,
                         K: tl.constexpr, DIL: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr):
        """out[p, :] = sum_{a,c} Wt[p, a*K+c] * Bv[s(i)+a*DIL, s(j)+c*DIL, :]: na2d_av, and the query-gradient of
        na2d_qk. Tiling as in ``_na2d_dot_kernel``; a (pixels x BD) fp32 accumulator, one tap per step."""
        pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // G).to(tl.int64)
        h = (pid_bh % G).to(tl.int64)
        i, j, pmask = _pixel_tile(pid_s, H, W, BH, BW)
        d = tl.arange(0, BD)
        m2 = pmask[:, None] & (d < D)[None, :]
        si = _win_start(i, H, K, DIL)
        sj = _win_start(j, W, K, DIL)
        w_ptr = Wt + b * swb + h * swh + i * swi + j * swj
        b_bh = Bv + b * sbb + h * sbh
        b_d = (d * sbd)[None, :]
        acc = tl.zeros((BH * BW, BD), dtype=tl.float32)
        for a in range(K):
            row = (si + a * DIL) * sbi
            for cc in range(K):
                w = tl.load(w_ptr + (a * K + cc) * swt, mask=pmask, other=0.0).to(tl.float32)
                v = tl.load(b_bh + (row + (sj + cc * DIL) * sbj)[:, None] + b_d, mask=m2, other=0.0).to(tl.float32)
                acc += w[:, None] * v
        o_ptr = Out + b * sob + h * soh + (i * soi + j * soj)[:, None] + (d * sod)[None, :]
        tl.store(o_ptr, acc.to(Out.dtype.element_ty), mask=m2)

    @triton.jit
    def _inverse_range(x, L, K: tl.constexpr, DIL: tl.constexpr):
        """The pixels whose window holds pixel ``x`` along one axis: a contiguous run of its dilation group,
        returned as (first pixel, count); the window start is monotone, so the run's ends have closed forms."""
        g = x % DIL
        xp = x // DIL
        group_len = (L - g + DIL - 1) // DIL
        lo = tl.where(xp < K, 0, xp - K // 2)
        hi = tl.where(xp >= group_len - K, group_len - 1, xp + K // 2)
        return lo * DIL + g, hi - lo + 1

    @triton.jit
    def _na2d_inv_kernel(Wt, A, Out, G, H, W, D, CNT_I, CNT_J,
                         swb, swh, swi, swj, swt, sab, sah, sai, saj, sad, sob, soh, soi, soj, sod,
                         K: tl.constexpr, DIL: tl.constexpr,
                         BH: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr):
        """out[x, :] = sum over pixels p whose window holds x of Wt[p, tap(p -> x)] * A[p, :]: the key-gradient of
        na2d_qk and the value-gradient of na2d_av, gathered (no atomics). One program: a tile of pixels ``x``; the
        inverse neighbourhood is walked as CNT_I rows x CNT_J columns (the longest runs), masked per pixel."""
        pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // G).to(tl.int64)
        h = (pid_bh % G).to(tl.int64)
        x, y, pmask = _pixel_tile(pid_s, H, W, BH, BW)
        d = tl.arange(0, BD)
        dmask = (d < D)[None, :]
        first_i, n_i = _inverse_range(x, H, K, DIL)
        first_j, n_j = _inverse_range(y, W, K, DIL)
        w_bh = Wt + b * swb + h * swh
        a_bh = A + b * sab + h * sah
        a_d = (d * sad)[None, :]
        acc = tl.zeros((BH * BW, BD), dtype=tl.float32)
        for r in range(CNT_I):
            qi = first_i + r * DIL
            tap_i = (x - _win_start(qi, H, K, DIL)) // DIL
            rmask = pmask & (r < n_i)
            w_row = qi * swi + tap_i * K * swt
            a_row = qi * sai
            for o in range(CNT_J):
                qj = first_j + o * DIL
                tap_j = (y - _win_start(qj, W, K, DIL)) // DIL
                m = rmask & (o < n_j)
                w = tl.load(w_bh + w_row + qj * swj + tap_j * swt, mask=m, other=0.0).to(tl.float32)
                av = tl.load(a_bh + (a_row + qj * saj)[:, None] + a_d, mask=m[:, None] & dmask, other=0.0)
                acc += w[:, None] * av.to(tl.float32)
        o_ptr = Out + b * sob + h * soh + (x * soi + y * soj)[:, None] + (d * sod)[None, :]
        tl.store(o_ptr, acc.to(Out.dtype.element_ty), mask=pmask[:, None] & dmask)

    def _tiles(H: int, W: int, D: int) -> Tuple[int, int, int]:
        """(BH, BW, BD): a tile of up to 64 pixels (at most 2048 values), as square as W allows."""
        bd = triton.next_power_of_2(D)
        p = max(1, min(64, 2048 // bd))
        bw = min(p, triton.next_power_of_2(W))
        return p // bw, bw, bd

    def _grid(x: torch.Tensor, bh: int, bw: int):
        B, G, H, W = x.shape[:4]
        return (B * G, triton.cdiv(H, bh) * triton.cdiv(W, bw))

    def _launch_dot(a: torch.Tensor, bv: torch.Tensor, bias: Optional[torch.Tensor], k: int, dil: int) -> torch.Tensor:
        B, G, H, W, D = a.shape
        out = a.new_empty(B, G, H, W, k * k)
        bh, bw, bd = _tiles(H, W, D)
        _na2d_dot_kernel[_grid(a, bh, bw)](
            a, bv, bias if bias is not None else a, out, G, H, W, D, *a.stride(), *bv.stride(), *out.stride(),
            K=k, KP=triton.next_power_of_2(k), DIL=dil, HAS_BIAS=bias is not None, BH=bh, BW=bw, BD=bd, num_warps=4)
        return out

    def _launch_sum(w: torch.Tensor, bv: torch.Tensor, k: int, dil: int) -> torch.Tensor:
        B, G, H, W, D = bv.shape
        out = bv.new_empty(B, G, H, W, D)
        bh, bw, bd = _tiles(H, W, D)
        _na2d_sum_kernel[_grid(bv, bh, bw)](w, bv, out, G, H, W, D, *w.stride(), *bv.stride(), *out.stride(),
                                            K=k, DIL=dil, BH=bh, BW=bw, BD=bd, num_warps=4)
        return out

    def _inverse_len(length: int, k: int, dil: int) -> int:
        """The longest run ``_inverse_range`` returns on an axis: a group of ``n`` pixels has runs of at most ``n``
        when ``n < 2k`` (a middle pixel is then seen by every pixel of its group), else at most ``k + k // 2``."""
        return max(n if n < 2 * k else k + k // 2 for n in {-(-length // dil), length // dil})

    def _launch_inv(w: torch.Tensor, a: torch.Tensor, k: int, dil: int) -> torch.Tensor:
        B, G, H, W, D = a.shape
        out = a.new_empty(B, G, H, W, D)
        bh, bw, bd = _tiles(H, W, D)
        _na2d_inv_kernel[_grid(a, bh, bw)](w, a, out, G, H, W, D, _inverse_len(H, k, dil), _inverse_len(W, k, dil),
                                           *w.stride(), *a.stride(), *out.stride(), K=k, DIL=dil, BH=bh, BW=bw, BD=bd,
                                           num_warps=4)
        return out

    def _rpb_grad(grad_attn: torch.Tensor, rpb: torch.Tensor, k: int, dil: int) -> torch.Tensor:
        """Sum of the logits' gradient into the bias entries each tap read (the index map is na2d_rpb's)."""
        H, W = grad_attn.shape[2:4]
        index = na2d_rpb(torch.arange(rpb.numel(), device=rpb.device).view(rpb.shape), H, W, k, dil)
        g = grad_attn.sum(0, dtype=torch.float32)
        grad = torch.zeros(rpb.numel(), device=rpb.device).index_add_(0, index.flatten(), g.flatten())
        return grad.view_as(rpb).to(rpb.dtype)

    @torch.library.custom_op("metamixer::na2d_qk", mutates_args=())
    def _na2d_qk_op(query: torch.Tensor, key: torch.Tensor, rpb: Optional[torch.Tensor], kernel_size: int,
                    dilation: int) -> torch.Tensor:
        return _launch_dot(query, key, rpb.contiguous() if rpb is not None else None, kernel_size, dilation)

    @_na2d_qk_op.register_fake
    def _(query, key, rpb, kernel_size, dilation):
        return query.new_empty(*query.shape[:4], kernel_size * kernel_size)

    @torch.library.custom_op("metamixer::na2d_av", mutates_args=())
    def _na2d_av_op(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
        return _launch_sum(attn, value, kernel_size, dilation)

    @_na2d_av_op.register_fake
    def _(attn, value, kernel_size, dilation):
        return value.new_empty(value.shape)

    @torch.library.custom_op("metamixer::na2d_inverse", mutates_args=())
    def _na2d_inverse_op(weights: torch.Tensor, a: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
        return _launch_inv(weights, a, kernel_size, dilation)

    @_na2d_inverse_op.register_fake
    def _(weights, a, kernel_size, dilation):
        return a.new_empty(a.shape)

    def _qk_setup(ctx, inputs, output):
        query, key, rpb, kernel_size, dilation = inputs
        ctx.save_for_backward(query, key, rpb)
        ctx.kernel_size, ctx.dilation = kernel_size, dilation

    def _qk_backward(ctx, grad):
        query, key, rpb = ctx.saved_tensors
        k, dil = ctx.kernel_size, ctx.dilation
        gq = _na2d_av_op(grad, key, k, dil) if ctx.needs_input_grad[0] else None
        gk = _na2d_inverse_op(grad, query, k, dil) if ctx.needs_input_grad[1] else None
        grpb = _rpb_grad(grad, rpb, k, dil) if rpb is not None and ctx.needs_input_grad[2] else None
        return gq, gk, grpb, None, None

    def _av_setup(ctx, inputs, output):
        attn, value, kernel_size, dilation = inputs
        ctx.save_for_backward(attn, value)
        ctx.kernel_size, ctx.dilation = kernel_size, dilation

    def _av_backward(ctx, grad):
        attn, value = ctx.saved_tensors
        k, dil = ctx.kernel_size, ctx.dilation
        ga = _na2d_qk_op(grad, value, None, k, dil) if ctx.needs_input_grad[0] else None
        gv = _na2d_inverse_op(attn, grad, k, dil) if ctx.needs_input_grad[1] else None
        return ga, gv, None, None

    _na2d_qk_op.register_autograd(_qk_backward, setup_context=_qk_setup)
    _na2d_av_op.register_autograd(_av_backward, setup_context=_av_setup)

    # Eager calls: the same launchers through plain autograd.Functions. A torch.library.custom_op costs ~40-60 us
    # of Python dispatch per call (measured on an H100 for ops/dwconv.py and ops/lif.py), which dominated these ops'
    # forward+backward at OverLoCK's shapes; the custom ops above remain the torch.compile path.
    class _QKFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, rpb, kernel_size, dilation):
            _qk_setup(ctx, (query, key, rpb, kernel_size, dilation), None)
            return _launch_dot(query, key, rpb.contiguous() if rpb is not None else None, kernel_size, dilation)

        @staticmethod
        def backward(ctx, grad):
            query, key, rpb = ctx.saved_tensors
            k, dil = ctx.kernel_size, ctx.dilation
            gq = _launch_sum(grad, key, k, dil) if ctx.needs_input_grad[0] else None
            gk = _launch_inv(grad, query, k, dil) if ctx.needs_input_grad[1] else None
            grpb = _rpb_grad(grad, rpb, k, dil) if rpb is not None and ctx.needs_input_grad[2] else None
            return gq, gk, grpb, None, None

    class _AVFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, attn, value, kernel_size, dilation):
            _av_setup(ctx, (attn, value, kernel_size, dilation), None)
            return _launch_sum(attn, value, kernel_size, dilation)

        @staticmethod
        def backward(ctx, grad):
            attn, value = ctx.saved_tensors
            k, dil = ctx.kernel_size, ctx.dilation
            ga = _launch_dot(grad, value, None, k, dil) if ctx.needs_input_grad[0] else None
            gv = _launch_inv(attn, grad, k, dil) if ctx.needs_input_grad[1] else None
            return ga, gv, None, None

register_op("na2d_qk", na2d_qk)
register_op("na2d_av", na2d_av)
