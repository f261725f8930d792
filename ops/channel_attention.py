"""Channel-group ("transposed") multi-head attention: DaViT's channel token mixer.

Semantics of ``channel_attention(qkv, num_heads, version=1)``:
  * ``qkv`` is ``(B, N, 3 * C)``: the output of the block's ``qkv`` Linear on ``N`` tokens, channel order
    ``(3, num_heads, head_dim)``; per head ``q, k, v`` are ``(N, d)`` with ``d = C // num_heads``.
  * The attention map is ``d x d`` (channels attend to channels, every token contributes):
      - ``version=1`` (DaViT, ECCV'22): ``A = softmax(k^T @ v * d**-0.5, dim=-1)``; ``out = q @ A^T``.
        Note the roles: ``k`` and ``v`` form the map, which is applied to ``q``.
      - ``version=2`` (Florence-2's DaViT): ``A = softmax(q^T @ k * N**-0.5, dim=-1)``; ``out = v @ A^T``.
        The scale depends on the number of tokens ``N`` (not on ``d``).
  * Returns ``(B, N, C)``, channel order ``(num_heads, head_dim)``.

Triton path (``impl='triton'``, and ``auto`` on CUDA; float64 always takes the reference):
head_dim 16/32/64/128, fp32/fp16/bf16 (fp32 accumulation; fp32 products in IEEE fp32), any token/batch strides
with contiguous channels.
Writing ``A = softmax(scale * a^T b)``, ``out = c @ A^T`` ((a, b, c) = (k, v, q) for version 1, (q, k, v) for 2):
  * ``gram`` kernel: ``a_h^T b_h`` per (batch, head), tokens split over programs (fp32 partial sums, summed after);
    the d x d softmax runs in PyTorch (tiny);
  * ``apply`` kernel: a tile of tokens times a d x d matrix per head, written straight into the (B, N, C) output
    (or into the q/k/v slices of the (B, N, 3C) gradient), so no permuted copies are made;
  * backward: ``dA = G^T c`` (gram), softmax backward on the d x d maps, then ``dc = G A``, ``da = b dS^T``,
    ``db = a dS`` (apply). Every token is read once per pass; qkv is read twice in the forward (gram + apply).
  * up to 256 tokens (head_dim <= 64: davit's 14x14 and 7x7 stages) one program per (batch, head) runs a whole
    pass instead: the forward's gram, softmax and apply in one kernel, the backward's gram, softmax backward and
    three applies in another (at these sizes the separate launches cost more than the work).
A ``torch.library.custom_op`` (``metamixer::channel_attention``, returning the fp32 maps as a second, non-
differentiable output kept for the backward) with its backward registered: opaque under ``torch.compile``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ops._dispatch import resolve_impl, triton_available, register_op

__all__ = ["channel_attention", "channel_attention_reference"]


def channel_attention_reference(qkv: torch.Tensor, num_heads: int, version: int = 1,
                                probs_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The definition (plain PyTorch). ``probs_fn`` is applied to the ``(B, heads, d, d)`` softmax weights (OFQ
    quantizes them there)."""
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv has {C3} channels, not a multiple of 3 * num_heads = {3 * num_heads}")
    C = C3 // 3
    d = C // num_heads
    q, k, v = qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
    if version == 1:
        a, b, c, scale = k, v, q, d ** -0.5
    elif version == 2:
        a, b, c, scale = q, k, v, N ** -0.5
    else:
        raise ValueError(f"channel attention version must be 1 or 2, got {version}")
    attn = ((a * scale).transpose(-2, -1) @ b).softmax(dim=-1)  # (B, heads, d, d)
    if probs_fn is not None:
        attn = probs_fn(attn)
    out = c @ attn.transpose(-2, -1)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(B, N, C)


def _triton_supported(qkv: torch.Tensor, num_heads: int, version: int) -> bool:
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads) or version not in (1, 2):
        return False
    d = qkv.shape[-1] // (3 * num_heads)
    return qkv.dtype in (torch.float32, torch.float16, torch.bfloat16) and d in (16, 32, 64, 128)


def channel_attention(qkv: torch.Tensor, num_heads: int, version: int = 1, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher the models call. ``auto`` takes the Triton kernels on CUDA (head_dim 16/32/64/128,
    fp32/fp16/bf16): davit_t trains and infers 1.1x faster than on the reference (benchmarks/bench_models.py,
    H100, bf16, batch 256; at the op level forward+backward measured 0.7-0.9x the reference at batch 64, where
    the Python/launch overhead of the small ops dominates)."""
    if resolve_impl(impl, qkv, _triton_supported(qkv, num_heads, version),
                    op="channel_attention", args=(qkv, num_heads, version)) == "reference":
        return channel_attention_reference(qkv, num_heads, version)
    if torch.is_autocast_enabled(qkv.device.type):  # the reference's matmuls would run in the autocast dtype
        qkv = qkv.to(torch.get_autocast_dtype(qkv.device.type))
    with torch.autocast(qkv.device.type, enabled=False):
        return torch.ops.metamixer.channel_attention(qkv, num_heads, version)[0]


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    from ops._dispatch import interpreting

    @triton.jit
    def _ca_chunk(X, off, n0, N, sxn, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
        """Tokens n0..n0+BN of one head (rows past N are zero), fp32 under IEEE."""
        n = n0 + tl.arange(0, BN)
        x = tl.load(X + off + n[:, None] * sxn + tl.arange(0, D)[None, :], mask=(n < N)[:, None], other=0.0)
        return x.to(tl.float32) if IEEE else x

    @triton.jit
    def _ca_mm(x, mat, IEEE: tl.constexpr):
        """x (tokens x D, input dtype) @ mat (D x D fp32), as the apply kernel computes it."""
        if IEEE:
            return tl.dot(x, mat, input_precision="ieee")
        return tl.dot(x, mat.to(x.dtype))

    @triton.jit
    def _ca_gram_loop(X, Y, xoff, yoff, n_start, n_end, N, sxn, syn, BN: tl.constexpr, D: tl.constexpr,
                      IEEE: tl.constexpr):
        """X_h^T @ Y_h over tokens n_start..n_end (fp32)."""
        acc = tl.zeros((D, D), dtype=tl.float32)
        for n0 in range(n_start, n_end, BN):
            x = _ca_chunk(X, xoff, n0, N, sxn, BN, D, IEEE)
            y = _ca_chunk(Y, yoff, n0, N, syn, BN, D, IEEE)
            if IEEE:
                acc += tl.dot(tl.trans(x), y, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(x), y)
        return acc

    @triton.jit
    def _ca_gram_kernel(X, Y, P, heads, N, CHUNK, sxb, sxn, syb, syn,
                        D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        """P[split, b*heads+h] = X_h^T @ Y_h over the tokens of one chunk (X_h = X[b, :, h*D:(h+1)*D]); fp32."""
        pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // heads).to(tl.int64)
        h = pid_bh % heads
        d = tl.arange(0, D)
        start = pid_s * CHUNK
        acc = _ca_gram_loop(X, Y, b * sxb + h * D, b * syb + h * D, start, tl.minimum(start + CHUNK, N), N, sxn,
                            syn, BN, D, IEEE)
        out = P + (pid_s * tl.num_programs(0) + pid_bh).to(tl.int64) * D * D + d[:, None] * D + d[None, :]
        tl.store(out, acc)

    @triton.jit
    def _ca_apply_kernel(X, M, Y, heads, N, sxb, sxn, syb, syn,
                         D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        """Y_h[tokens] = X_h[tokens] @ M[b*heads+h] for a tile of BN tokens (M: fp32 D x D, cast to X's dtype)."""
        pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
        b = (pid_bh // heads).to(tl.int64)
        h = pid_bh % heads
        d = tl.arange(0, D)
        n = pid_n * BN + tl.arange(0, BN)
        mat = tl.load(M + pid_bh.to(tl.int64) * D * D + d[:, None] * D + d[None, :])
        y = _ca_mm(_ca_chunk(X, b * sxb + h * D, pid_n * BN, N, sxn, BN, D, IEEE), mat, IEEE)
        tl.store(Y + b * syb + h * D + n[:, None] * syn + d[None, :], y.to(Y.dtype.element_ty), mask=(n < N)[:, None])

    @triton.jit
    def _ca_fused_fwd_kernel(A, Bt, Cm, Y, Attn, heads, N, scale, sxb, sxn, syb, syn,
                             D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        """One program per (batch, head) does the whole forward: S = scale * a^T b over all tokens, the softmax
        A (stored, fp32, for the backward), then out = c @ A^T tile by tile (few tokens: the maps' work is tiny
        and separate gram / softmax / apply launches cost more than it)."""
        pid = tl.program_id(0)
        b = (pid // heads).to(tl.int64)
        h = pid % heads
        xoff = b * sxb + h * D
        s = _ca_gram_loop(A, Bt, xoff, xoff, 0, N, N, sxn, sxn, BN, D, IEEE) * scale
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        att = e / tl.sum(e, axis=1)[:, None]
        d = tl.arange(0, D)
        tl.store(Attn + pid.to(tl.int64) * D * D + d[:, None] * D + d[None, :], att)
        mat = tl.trans(att)
        for n0 in range(0, N, BN):
            n = n0 + tl.arange(0, BN)
            y = _ca_mm(_ca_chunk(Cm, xoff, n0, N, sxn, BN, D, IEEE), mat, IEEE)
            tl.store(Y + b * syb + h * D + n[:, None] * syn + d[None, :], y.to(Y.dtype.element_ty),
                     mask=(n < N)[:, None])

    @triton.jit
    def _ca_fused_bwd_kernel(G, A, Bt, Cm, Attn, GA, GB, GC, heads, N, scale, sgb, sgn, sxb, sxn, sob, son,
                             D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        """The whole backward of one (batch, head): dA = g^T c, the softmax backward dS, then per token tile
        dc = g A, da = b dS^T, db = a dS written into the gradient's q/k/v slices."""
        pid = tl.program_id(0)
        b = (pid // heads).to(tl.int64)
        h = pid % heads
        goff = b * sgb + h * D
        xoff = b * sxb + h * D
        d = tl.arange(0, D)
        att = tl.load(Attn + pid.to(tl.int64) * D * D + d[:, None] * D + d[None, :])
        g_att = _ca_gram_loop(G, Cm, goff, xoff, 0, N, N, sgn, sxn, BN, D, IEEE)
        g_s = att * (g_att - tl.sum(g_att * att, axis=1)[:, None]) * scale
        g_st = tl.trans(g_s)
        for n0 in range(0, N, BN):
            n = n0 + tl.arange(0, BN)
            m = (n < N)[:, None]
            out = b * sob + h * D + n[:, None] * son + d[None, :]
            gc = _ca_mm(_ca_chunk(G, goff, n0, N, sgn, BN, D, IEEE), att, IEEE)
            tl.store(GC + out, gc.to(GC.dtype.element_ty), mask=m)
            ga = _ca_mm(_ca_chunk(Bt, xoff, n0, N, sxn, BN, D, IEEE), g_st, IEEE)
            tl.store(GA + out, ga.to(GA.dtype.element_ty), mask=m)
            gb = _ca_mm(_ca_chunk(A, xoff, n0, N, sxn, BN, D, IEEE), g_s, IEEE)
            tl.store(GB + out, gb.to(GB.dtype.element_ty), mask=m)

    _BN = 64
    # up to this many tokens (and head_dim <= 64: the d x d maps live in registers) one program per (batch, head)
    # does a whole pass (davit's stages 3-4)
    _FUSED_MAX_N = 256

    def _ieee(x: torch.Tensor) -> bool:
        """fp32 products in fp32 (not tf32); the interpreter also needs it for bf16 (its bf16 dot is wrong)."""
        return x.dtype == torch.float32 or interpreting()

    def _gram(x: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
        """``x_h^T @ y_h`` per (batch, head): fp32 ``[B*heads, d, d]``; the token sum is split over programs."""
        B, N, C = x.shape
        d = C // heads
        target = 4 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1)
        splits = max(1, min(triton.cdiv(N, _BN), target // (B * heads)))
        chunk = triton.cdiv(triton.cdiv(N, splits), _BN) * _BN
        splits = triton.cdiv(N, chunk)
        part = torch.empty(splits, B * heads, d, d, device=x.device, dtype=torch.float32)
        _ca_gram_kernel[(B * heads, splits)](x, y, part, heads, N, chunk, x.stride(0), x.stride(1), y.stride(0),
                                            y.stride(1), D=d, BN=_BN, IEEE=_ieee(x), num_warps=8 if d >= 128 else 4)
        return part.sum(0) if splits > 1 else part[0]

    def _apply(x: torch.Tensor, mat: torch.Tensor, out: torch.Tensor, heads: int) -> torch.Tensor:
        """``out_h = x_h @ mat[b*heads+h]`` written into ``out`` (any token/batch strides, channels contiguous)."""
        B, N, C = x.shape
        _ca_apply_kernel[(B * heads, triton.cdiv(N, _BN))](
            x, mat.contiguous(), out, heads, N, x.stride(0), x.stride(1), out.stride(0), out.stride(1), D=C // heads,
            BN=_BN, IEEE=_ieee(x), num_warps=4)
        return out

    def _roles(qkv: torch.Tensor, version: int):
        """(a, b, c) with ``A = softmax(scale * a^T b)``, ``out = c @ A^T`` (module doc), as views of ``qkv``."""
        C = qkv.shape[-1] // 3
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        return (k, v, q) if version == 1 else (q, k, v)

    def _scale(qkv: torch.Tensor, heads: int, version: int) -> float:
        return (qkv.shape[-1] // (3 * heads)) ** -0.5 if version == 1 else qkv.shape[1] ** -0.5

    @torch.library.custom_op("metamixer::channel_attention", mutates_args=())
    def _channel_attention_op(qkv: torch.Tensor, num_heads: int, version: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns the output and the fp32 attention maps ``[B*heads, d, d]`` (kept for the backward)."""
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        a, b, c = _roles(qkv, version)
        B, N, C = c.shape
        d = C // num_heads
        if N <= _FUSED_MAX_N and d <= 64:
            out = c.new_empty(c.shape)
            attn = torch.empty(B * num_heads, d, d, device=qkv.device, dtype=torch.float32)
            _ca_fused_fwd_kernel[(B * num_heads,)](a, b, c, out, attn, num_heads, N, _scale(qkv, num_heads, version),
                                                  qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), D=d,
                                                  BN=_BN, IEEE=_ieee(qkv), num_warps=4)
            return out, attn
        attn = (_gram(a, b, num_heads) * _scale(qkv, num_heads, version)).softmax(-1)
        return _apply(c, attn.transpose(-1, -2), c.new_empty(c.shape), num_heads), attn

    @_channel_attention_op.register_fake
    def _(qkv, num_heads, version):
        B, N, C3 = qkv.shape
        d = C3 // (3 * num_heads)
        return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(B * num_heads, d, d, dtype=torch.float32)

    @torch.library.custom_op("metamixer::channel_attention_backward", mutates_args=())
    def _channel_attention_bwd_op(grad: torch.Tensor, qkv: torch.Tensor, attn: torch.Tensor, num_heads: int,
                                  version: int) -> torch.Tensor:
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        a, b, c = _roles(qkv, version)
        B, N, C = c.shape
        if N <= _FUSED_MAX_N and C // num_heads <= 64:
            out = torch.empty_like(qkv, memory_format=torch.contiguous_format)
            g_a, g_b, g_c = _roles(out, version)
            _ca_fused_bwd_kernel[(B * num_heads,)](
                grad, a, b, c, attn, g_a, g_b, g_c, num_heads, N, _scale(qkv, num_heads, version), grad.stride(0),
                grad.stride(1), qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), D=C // num_heads, BN=_BN,
                IEEE=_ieee(qkv), num_warps=4)
            return out
        g_attn = _gram(grad, c, num_heads)
        g_s = attn * (g_attn - (g_attn * attn).sum(-1, keepdim=True)) * _scale(qkv, num_heads, version)
        out = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        g_a, g_b, g_c = _roles(out, version)
        _apply(grad, attn, g_c, num_heads)
        _apply(b, g_s.transpose(-1, -2), g_a, num_heads)
        _apply(a, g_s, g_b, num_heads)
        return out

    @_channel_attention_bwd_op.register_fake
    def _(grad, qkv, attn, num_heads, version):
        return torch.empty_like(qkv, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        qkv, num_heads, version = inputs
        ctx.save_for_backward(qkv, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.num_heads, ctx.version = num_heads, version

    def _backward(ctx, grad, _grad_attn):
        qkv, attn = ctx.saved_tensors
        return _channel_attention_bwd_op(grad, qkv, attn, ctx.num_heads, ctx.version), None, None

    _channel_attention_op.register_autograd(_backward, setup_context=_setup_context)

register_op("channel_attention", channel_attention)
