"""Spiking self-attention (Spikformer's SSA core) fused with its LIF neuron: ``LIF((q @ (k^T @ v)) * scale)``.

Definition (``spiking_attention_reference``): ``q, k, v`` of shape ``(T, ..., N, d)`` (time first, then batch and
heads, N tokens, d channels per head) are binary spike maps; per time step and head ``x = (q @ (k^T @ v)) * scale``
(no softmax; the cheap order: ``k^T @ v`` is only ``d x d``), then the multi-step LIF of ``ops/lif.py`` over the T
steps of ``x`` (Spikformer's ``attn_lif``: tau 2, threshold 0.5, hard reset to 0, detach_reset). The result is the
spike map ``(T, ..., N, d)``. On 0/1 inputs ``k^T @ v`` and ``q @ (k^T @ v)`` are integer counts, exact in fp32 (up to
2^24), and a power-of-two ``scale`` keeps ``x`` exact.

Triton path (``impl='triton'``, or ``auto`` on CUDA; float64 always takes the reference), for 5-D
``(T, B, heads, N, d)`` inputs in any strides (the transposed head views Spikformer makes):
  * bf16/fp16 (the autocast case): ``kv = k^T @ v`` is a batched matmul (``T*B*heads`` products of ``d x N`` by
    ``N x d``: tiny); one kernel then computes, per tile of ``BLOCK_N`` tokens x d channels of one (batch, head),
    ``q_t @ kv_t`` with ``tl.dot`` (16-bit operands, fp32 accumulation: exact counts), scales it and runs the LIF
    over all T steps with the membrane in registers, writing only the spikes and the LIF's ``z`` (see
    ``ops/lif.py``; no ``z`` without a gradient to compute): the pre-activation ``x`` never goes to memory. The
    output is a ``(T, B, heads, N, d)`` view of a ``(T, B, heads, d, N)`` buffer, so folding the heads back into
    channels (``(T, B, C, N)``) is free. ``x`` stays in fp32 (the reference rounds the matmul result and the scaled
    value to bf16), so the spikes equal the reference run on fp32-upcast inputs while the counts in ``kv`` fit the
    16-bit type exactly (N <= 256 for bf16, 2048 for fp16; beyond that ``kv`` is rounded as the reference rounds it
    under autocast). Backward: the LIF backward kernel
    gives dL/dx, then four batched matmuls give dL/dq, dL/dk, dL/dv;
  * fp32: cuBLAS matmuls + the Triton LIF (``ops.lif_multistep``): the fused kernel's exact fp32 ``tl.dot`` runs on
    FMA units and measured 10x slower than that on an H100 (benchmarks/bench_lif.py).
Under ``torch.compile`` the fused path is a ``torch.library.custom_op`` (``metamixer::spiking_attention``, backward
registered); eager calls take a plain ``autograd.Function`` over the same code. Under autocast the inputs are cast
to the autocast dtype as ``matmul`` would.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._dispatch import autocast_dtype, interpreting, register_op, resolve_impl, triton_available
from .lif import lif_multistep, lif_multistep_reference

__all__ = ["spiking_attention", "spiking_attention_reference"]


def spiking_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tau: float = 2.0,
                                v_threshold: float = 0.5, v_reset: Optional[float] = 0.0, detach_reset: bool = True,
                                decay_input: bool = True, alpha: float = 4.0) -> torch.Tensor:
    """Spikes ``LIF((q @ (k^T @ v)) * scale)`` for ``q, k, v`` of shape ``(T, ..., N, d)`` (see the module doc)."""
    x = (q @ (k.transpose(-2, -1) @ v)) * scale
    return lif_multistep_reference(x, tau, v_threshold, v_reset, detach_reset, decay_input, alpha)


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def spiking_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tau: float = 2.0,
                      v_threshold: float = 0.5, v_reset: Optional[float] = 0.0, detach_reset: bool = True,
                      decay_input: bool = True, alpha: float = 4.0, impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: on CUDA the fused Triton kernel for 5-D bf16/fp16 inputs, cuBLAS matmuls + the Triton LIF for
    fp32 (see the module docstring); the reference elsewhere."""
    dtype = autocast_dtype(q) or q.dtype
    supported = (q.ndim == 5 and q.shape == k.shape == v.shape and dtype in _TRITON_DTYPES
                 and q.dtype == k.dtype == v.dtype and q.numel() > 0)
    if resolve_impl(impl, q, supported,
                    op="spiking_attention", args=(q, k, v, scale, tau, v_threshold, v_reset, detach_reset,
                                             decay_input, alpha)) == "reference":
        return spiking_attention_reference(q, k, v, scale, tau, v_threshold, v_reset, detach_reset, decay_input,
                                           alpha)
    lif = (float(tau), float(v_threshold), None if v_reset is None else float(v_reset), bool(detach_reset),
           bool(decay_input), float(alpha))
    if dtype == torch.float32:
        return lif_multistep((q @ (k.transpose(-2, -1) @ v)) * scale, *lif, impl="triton")
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast(q.device.type, enabled=False):
        if torch.compiler.is_compiling():
            s = torch.ops.metamixer.spiking_attention(q, k, v, float(scale), *lif)[0]
        elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            s = _SpikingAttentionFunction.apply(q, k, v, float(scale), *lif)
        else:
            s = _ssa_forward(q, k, v, float(scale), *lif, store_z=False)[0]
    return s.transpose(-1, -2)


# ---- Triton kernel ---------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    from .lif import lif_backward_triton, lif_constants, lif_step

    @triton.jit
    def _ssa_lif_fwd_kernel(Q, KV, S, Z, NH, N, D, sqt, sqb, sqh, sqn, sqd, scale, tau, decay, v_th, v_reset,
                            T: tl.constexpr, HARD: tl.constexpr, VR_ZERO: tl.constexpr, DECAY_INPUT: tl.constexpr,
                            STORE_Z: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        """One program: BLOCK_N tokens x all d channels of one (batch, head), all T steps. ``KV`` is contiguous
        (T, B*NH, D, D); ``S``/``Z`` are contiguous (T, B*NH, D, N)."""
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.arange(0, BLOCK_D)
        nm, em = n < N, e < D
        q_ptr = (Q + (pid_bh // NH).to(tl.int64) * sqb + (pid_bh % NH) * sqh
                 + n[:, None] * sqn + e[None, :] * sqd)
        bh_count = tl.num_programs(1).to(tl.int64)
        kv_ptr = KV + pid_bh.to(tl.int64) * D * D + e[:, None] * D + e[None, :]
        o_off = pid_bh.to(tl.int64) * D * N + e[None, :] * N + n[:, None]
        qmask = nm[:, None] & em[None, :]
        v = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32) + v_reset
        for t in tl.static_range(T):
            qt = tl.load(q_ptr + t * sqt, mask=qmask, other=0.0)
            kvt = tl.load(kv_ptr + t * bh_count * D * D, mask=em[:, None] & em[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot mis-reads bf16 operands
                qt, kvt = qt.to(tl.float32), kvt.to(tl.float32)
            x = tl.dot(qt, kvt) * scale  # 16-bit operands, fp32 accumulation: exact integer counts
            s, z, v = lif_step(x, v, tau, decay, v_th, v_reset, HARD, VR_ZERO, DECAY_INPUT)
            o = o_off + t * bh_count * D * N
            tl.store(S + o, s.to(S.dtype.element_ty), mask=qmask)
            if STORE_Z:
                tl.store(Z + o, z.to(Z.dtype.element_ty), mask=qmask)

    def _z_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32

    def _out_shape(q: torch.Tensor) -> Tuple[int, ...]:
        T, B, H, N, D = q.shape
        return (T, B, H, D, N)

    def _ssa_forward(q, k, v, scale, tau, v_threshold, v_reset, detach_reset, decay_input, alpha, store_z=True):
        """Spikes and z, both (T, B, H, D, N) contiguous, and kv = k^T @ v."""
        T, B, H, N, D = q.shape
        kv = torch.matmul(k.transpose(-2, -1), v).contiguous()  # (T, B, H, D, D), tiny
        s = q.new_empty(_out_shape(q))
        z = q.new_empty(_out_shape(q), dtype=_z_dtype(q.dtype)) if store_z else s
        block_d = max(16, triton.next_power_of_2(D))
        block_n = 64 if block_d <= 64 else 32
        args, flags = lif_constants(tau, v_threshold, v_reset)
        extra = {} if interpreting() else dict(num_warps=4, enable_fp_fusion=False)
        _ssa_lif_fwd_kernel[(triton.cdiv(N, block_n), B * H)](
            q, kv, s, z, H, N, D, q.stride(0), q.stride(1), q.stride(2), q.stride(3), q.stride(4), scale, *args,
            T=T, DECAY_INPUT=decay_input, STORE_Z=store_z, UPCAST=interpreting() and q.dtype == torch.bfloat16,
            BLOCK_N=block_n, BLOCK_D=block_d, **flags, **extra)
        return s, z, kv

    def _ssa_backward(lif_bwd, grad_s, q, k, v, kv, z, scale, lif):
        gx = lif_bwd(grad_s, z, *lif)  # (T, B, H, D, N), z's layout
        gm = gx.transpose(-1, -2) * scale  # dL/d(q @ kv)
        gkv = q.transpose(-1, -2) @ gm
        return gm @ kv.transpose(-1, -2), v @ gkv.transpose(-1, -2), k @ gkv

    class _SpikingAttentionFunction(torch.autograd.Function):
        """Eager path (skips the custom op's dispatch cost, as in ``ops/lif.py``)."""

        @staticmethod
        def forward(ctx, q, k, v, scale, *lif):
            s, z, kv = _ssa_forward(q, k, v, scale, *lif)
            ctx.save_for_backward(q, k, v, kv, z)
            ctx.scale, ctx.lif = scale, lif
            return s

        @staticmethod
        def backward(ctx, grad_s):
            def lif_bwd(g, z, *lif):
                return lif_backward_triton(g, z, *lif, g.dtype)
            return _ssa_backward(lif_bwd, grad_s, *ctx.saved_tensors, ctx.scale, ctx.lif) + (None,) * 7

    @torch.library.custom_op("metamixer::spiking_attention", mutates_args=())
    def _ssa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tau: float, v_threshold: float,
                v_reset: Optional[float], detach_reset: bool, decay_input: bool,
                alpha: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _ssa_forward(q, k, v, scale, tau, v_threshold, v_reset, detach_reset, decay_input, alpha)

    @_ssa_op.register_fake
    def _(q, k, v, scale, tau, v_threshold, v_reset, detach_reset, decay_input, alpha):
        T, B, H, N, D = q.shape
        return (q.new_empty(_out_shape(q)), q.new_empty(_out_shape(q), dtype=_z_dtype(q.dtype)),
                q.new_empty(T, B, H, D, D))

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3], output[2], output[1])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.lif = inputs[3], inputs[4:]

    def _backward(ctx, grad_s, grad_z, grad_kv):
        grads = _ssa_backward(torch.ops.metamixer.lif_multistep_backward, grad_s, *ctx.saved_tensors, ctx.scale,
                              ctx.lif)
        return grads + (None,) * 7

    _ssa_op.register_autograd(_backward, setup_context=_setup_context)

register_op("spiking_attention", spiking_attention)
