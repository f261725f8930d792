"""Multi-step leaky integrate-and-fire (LIF) neuron: the spiking nonlinearity of Spikformer.

Semantics are those of spikingjelly's ``clock_driven.neuron.MultiStepLIFNode`` (0.0.0.0.12-0.0.0.0.14, torch
backend; its CuPy kernel computes the same recurrence), which the official Spikformer code uses. The op is
stateless: every call starts from a fresh membrane potential, so there is nothing to reset between batches.

Input ``x_seq`` has shape ``(T, ...)``: time is dim 0, the recurrence runs over it, every other element is an
independent neuron. With ``v_r = v_reset`` (``0`` for soft reset, ``v_reset=None``) and ``v = v_r`` before step 0,
for ``t = 0 .. T-1``::

    charge  decay_input:      h = v + (x_t - (v - v_r)) / tau        (v_r == 0:  h = v + (x_t - v) / tau)
            not decay_input:  h = v - (v - v_r) / tau + x_t          (v_r == 0:  h = v * (1 - 1 / tau) + x_t)
    fire    s_t = 1 if h >= v_threshold else 0                      (ties fire: Heaviside(h - v_threshold), H(0) = 1)
    reset   hard (v_reset is a number):  v = (1 - s') * h + s' * v_reset
            soft (v_reset is None):      v = h - s' * v_threshold
            with s' = s_t.detach() if detach_reset else s_t

The output is the spike train ``s`` (exactly 0/1, same shape and dtype as ``x_seq``). Division by ``tau`` is a true
division (``tau=2`` is exact), as in spikingjelly's torch backend.

Backward (BPTT through the recurrence): the Heaviside step has the sigmoid surrogate derivative
``dH/dz = alpha * sigmoid(alpha * z) * (1 - sigmoid(alpha * z))`` at ``z = h - v_threshold`` (spikingjelly's
``surrogate.Sigmoid(alpha=4.0)``, Spikformer's default); every other operation is differentiated exactly, and with
``detach_reset`` the reset does not propagate gradient through the spike.

``lif_multistep_reference`` is the definition; ``lif_multistep`` is the dispatcher models call; ``MultiStepLIF`` is a
parameter-free module around the dispatcher. The reference (a Python loop over T plus one ``autograd.Function``)
traces without graph breaks under ``torch.compile`` (checked with ``fullgraph=True`` on the ``aot_eager`` backend).

Triton path (``impl='triton'``, or ``auto`` on CUDA; float64 always takes the reference): fp32, bf16 and fp16, any T
and any neuron count (masked tail). Two kernels, each one pass over memory:
  * forward: one program owns BLOCK neurons and runs all T steps with the membrane potential in fp32 registers; it
    writes the spikes and ``z_t = h_t - v_threshold`` (the pre-spike potential relative to the threshold), the only
    thing the backward needs (``s_t = z_t >= 0``, ``h_t = z_t + v_threshold``). ``z`` is stored in bf16 for bf16
    inputs (round-to-nearest keeps its sign, so the spikes stay exact) and in fp32 otherwise;
  * backward: the same programs walk t = T-1 .. 0 carrying dL/dv in registers (BPTT).
The state is fp32 whatever the input dtype, so for bf16/fp16 inputs the spikes equal the reference run on the
fp32-upcast input (the bf16 reference rounds every intermediate to bf16). Inputs are read in their memory layout when
time is the outermost dimension of a dense tensor (NCHW or channels-last per step), otherwise made contiguous.
Without a gradient to compute, the forward writes the spikes only (one read, one write: the copy floor). Under
``torch.compile`` the kernels run as a ``torch.library.custom_op`` (``metamixer::lif_multistep``, backward
registered; an opaque op to the compiler); eager calls take a plain ``autograd.Function`` over the same launchers,
which skips the custom op's dispatch cost. Fusing the preceding BatchNorm's affine was not done: in training
BatchNorm needs batch statistics (a reduction before the affine) and its own backward, so the fusion would save one
elementwise pass only by re-implementing BatchNorm.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ._dispatch import interpreting, resolve_impl, triton_available, register_op

__all__ = ["lif_multistep", "lif_multistep_reference", "MultiStepLIF", "sigmoid_surrogate_spike"]


class _SigmoidSurrogateSpike(torch.autograd.Function):
    """Heaviside step ``z >= 0`` forward; sigmoid-derivative surrogate backward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.alpha = alpha
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (z,) = ctx.saved_tensors
        sg = torch.sigmoid(z * ctx.alpha)
        return grad_output * (1.0 - sg) * sg * ctx.alpha, None


def sigmoid_surrogate_spike(z: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """``1.0 where z >= 0 else 0.0`` with the sigmoid surrogate gradient of slope ``alpha``."""
    return _SigmoidSurrogateSpike.apply(z, alpha)


def lif_multistep_reference(x_seq: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0,
                            v_reset: Optional[float] = 0.0, detach_reset: bool = True, decay_input: bool = True,
                            alpha: float = 4.0) -> torch.Tensor:
    """Spikes of a layer of LIF neurons driven by ``x_seq`` of shape ``(T, ...)`` (see the module docstring)."""
    if x_seq.ndim < 1 or x_seq.shape[0] < 1:
        raise ValueError(f"x_seq must have a leading time dimension of length >= 1, got shape {tuple(x_seq.shape)}")
    v_r = 0.0 if v_reset is None else v_reset
    v = torch.full_like(x_seq[0], v_r)
    spikes = []
    for x in x_seq.unbind(0):
        if decay_input:
            h = v + (x - v) / tau if v_r == 0.0 else v + (x - (v - v_r)) / tau
        else:
            h = v * (1.0 - 1.0 / tau) + x if v_r == 0.0 else v - (v - v_r) / tau + x
        s = sigmoid_surrogate_spike(h - v_threshold, alpha)
        s_r = s.detach() if detach_reset else s
        v = h - s_r * v_threshold if v_reset is None else (1.0 - s_r) * h + s_r * v_reset
        spikes.append(s)
    return torch.stack(spikes)


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _time_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it is dense with time outermost (step t is the t-th block of ``x[0].numel()`` elements in
    memory, any layout inside a step), else a contiguous copy."""
    expected = 1  # dense: ordered by stride, each stride is the number of elements below it
    for size, stride in sorted(((n, st) for n, st in zip(x.shape, x.stride()) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return x.contiguous()
        expected *= size
    return x if x.shape[0] == 1 or x.stride(0) == x[0].numel() else x.contiguous()


def lif_multistep(x_seq: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                  detach_reset: bool = True, decay_input: bool = True, alpha: float = 4.0,
                  impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: the Triton kernels on CUDA for fp32/bf16/fp16 (see the module docstring), else the reference."""
    supported = x_seq.dtype in _TRITON_DTYPES and x_seq.ndim >= 1 and x_seq.numel() > 0
    if resolve_impl(impl, x_seq, supported,
                    op="lif_multistep", args=(x_seq, tau, v_threshold, v_reset, detach_reset, decay_input,
                                              alpha)) == "reference":
        return lif_multistep_reference(x_seq, tau, v_threshold, v_reset, detach_reset, decay_input, alpha)
    x = _time_major(x_seq)
    args = (float(tau), float(v_threshold), None if v_reset is None else float(v_reset), bool(detach_reset),
            bool(decay_input), float(alpha))
    if torch.compiler.is_compiling():
        return torch.ops.metamixer.lif_multistep(x, *args)[0]
    if torch.is_grad_enabled() and x.requires_grad:
        return _LifFunction.apply(x, *args)
    return lif_forward_triton(x, tau, v_threshold, v_reset, decay_input, store_z=False)[0]


class MultiStepLIF(nn.Module):
    """Parameter-free module form of :func:`lif_multistep` (spikingjelly ``MultiStepLIFNode`` drop-in, no state)."""

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 detach_reset: bool = True, decay_input: bool = True, alpha: float = 4.0):
        super().__init__()
        self.tau, self.v_threshold, self.v_reset = tau, v_threshold, v_reset
        self.detach_reset, self.decay_input, self.alpha = detach_reset, decay_input, alpha

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return lif_multistep(x_seq, self.tau, self.v_threshold, self.v_reset, self.detach_reset, self.decay_input,
                             self.alpha)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
                f"detach_reset={self.detach_reset}, decay_input={self.decay_input}, alpha={self.alpha}")


# ---- Triton kernels --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def lif_step(x, v, tau, decay, v_th, v_reset, HARD: tl.constexpr, VR_ZERO: tl.constexpr,
                 DECAY_INPUT: tl.constexpr):
        """One LIF step on fp32 ``x`` and state ``v``: returns (spike, z = h - v_th, new v). Same operation order
        as the reference (true division), so fp32 spikes are bit-identical. ``decay`` is fp32(1 - 1/tau);
        ``v_reset`` is 0 for soft reset; ``VR_ZERO``: ``v_reset == 0`` (the reference's shorter formulas)."""
        if DECAY_INPUT:
            if VR_ZERO:
                h = v + tl.math.div_rn(x - v, tau)
            else:
                h = v + tl.math.div_rn(x - (v - v_reset), tau)
        else:
            if VR_ZERO:
                h = v * decay + x
            else:
                h = v - tl.math.div_rn(v - v_reset, tau) + x
        z = h - v_th
        s = (z >= 0.0).to(tl.float32)
        if HARD:
            v = (1.0 - s) * h + s * v_reset
        else:
            v = h - s * v_th
        return s, z, v

    @triton.jit
    def lif_grad_step(gs, gv, z, tau, decay, v_th, v_reset, alpha, HARD: tl.constexpr, DETACH: tl.constexpr,
                      DECAY_INPUT: tl.constexpr):
        """One reverse step: from dL/ds_t, dL/dv_t and z_t, return (dL/dx_t, dL/dv_{t-1})."""
        sig = tl.sigmoid(z * alpha)
        sg = (1.0 - sig) * sig * alpha  # surrogate dH/dz
        if HARD:  # v = (1 - s) h + s v_reset
            dv_dh = 1.0 - (z >= 0.0).to(tl.float32)
            if not DETACH:
                dv_dh += sg * (v_reset - (z + v_th))
            gh = gs * sg + gv * dv_dh
        elif DETACH:  # v = h - s v_th
            gh = gs * sg + gv
        else:
            gh = gs * sg + gv * (1.0 - sg * v_th)
        gx = tl.math.div_rn(gh, tau) if DECAY_INPUT else gh
        return gx, gh * decay

    @triton.jit
    def _lif_fwd_kernel(X, S, Z, N, tau, decay, v_th, v_reset, T: tl.constexpr, HARD: tl.constexpr,
                        VR_ZERO: tl.constexpr, DECAY_INPUT: tl.constexpr, STORE_Z: tl.constexpr,
                        BLOCK: tl.constexpr):
        """One program: BLOCK neurons, all T steps (state in registers). Step t of neuron n lives at t * N + n.
        ``STORE_Z=False`` (no gradient needed) writes the spikes only."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        X, S, Z = X + offs, S + offs, Z + offs  # pointers advance by N per step (64-bit: no T * N overflow)
        v = tl.zeros((BLOCK,), dtype=tl.float32) + v_reset
        for t in tl.static_range(T):
            x = tl.load(X, mask=mask, other=0.0).to(tl.float32)
            s, z, v = lif_step(x, v, tau, decay, v_th, v_reset, HARD, VR_ZERO, DECAY_INPUT)
            tl.store(S, s.to(S.dtype.element_ty), mask=mask)
            if STORE_Z:
                tl.store(Z, z.to(Z.dtype.element_ty), mask=mask)
            X, S, Z = X + N, S + N, Z + N

    @triton.jit
    def _lif_bwd_kernel(GS, Z, GX, N, tau, decay, v_th, v_reset, alpha, T: tl.constexpr, HARD: tl.constexpr,
                        DETACH: tl.constexpr, DECAY_INPUT: tl.constexpr, BLOCK: tl.constexpr):
        """BPTT: one program, BLOCK neurons, t = T-1 .. 0 with dL/dv carried in registers."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        GS, Z, GX = GS + offs, Z + offs, GX + offs
        for t in tl.static_range(T - 1):  # to step T-1 (64-bit pointer steps: no T * N overflow)
            GS, Z, GX = GS + N, Z + N, GX + N
        gv = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in tl.static_range(T):
            gs = tl.load(GS, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(Z, mask=mask, other=0.0).to(tl.float32)
            gx, gv = lif_grad_step(gs, gv, z, tau, decay, v_th, v_reset, alpha, HARD, DETACH, DECAY_INPUT)
            tl.store(GX, gx.to(GX.dtype.element_ty), mask=mask)
            GS, Z, GX = GS - N, Z - N, GX - N

    def _launch(kernel, n: int, *args, **meta) -> None:
        block = min(1024, triton.next_power_of_2(n)) if interpreting() else 1024
        extra = {} if interpreting() else dict(num_warps=4, enable_fp_fusion=False)  # no FMA: reference rounding
        kernel[(triton.cdiv(n, block),)](*args, **meta, BLOCK=block, **extra)

    def _z_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32

    def lif_constants(tau: float, v_threshold: float, v_reset: Optional[float]):
        """Scalar kernel arguments (tau, decay, v_th, v_reset or 0) and flags (HARD, VR_ZERO)."""
        v_r = 0.0 if v_reset is None else float(v_reset)
        return (float(tau), 1.0 - 1.0 / tau, float(v_threshold), v_r), dict(HARD=v_reset is not None,
                                                                            VR_ZERO=v_r == 0.0)

    def lif_forward_triton(x: torch.Tensor, tau: float, v_threshold: float, v_reset: Optional[float],
                           decay_input: bool, store_z: bool = True):
        """Spikes and z of a time-major dense ``x`` (see ``_time_major``); both keep ``x``'s layout."""
        s = torch.empty_like(x)
        z = torch.empty_like(x, dtype=_z_dtype(x.dtype)) if store_z else s
        n = x[0].numel()
        args, flags = lif_constants(tau, v_threshold, v_reset)
        _launch(_lif_fwd_kernel, n, x, s, z, n, *args, T=x.shape[0], DECAY_INPUT=decay_input, STORE_Z=store_z,
                **flags)
        return s, z

    def lif_backward_triton(grad: torch.Tensor, z: torch.Tensor, tau: float, v_threshold: float,
                            v_reset: Optional[float], detach_reset: bool, decay_input: bool, alpha: float,
                            out_dtype: torch.dtype) -> torch.Tensor:
        """dL/dx from dL/ds and the forward's z (the result has z's layout)."""
        if grad.stride() != z.stride():
            grad = torch.empty_like(z, dtype=grad.dtype).copy_(grad)
        gx = torch.empty_like(z, dtype=out_dtype)
        n = z[0].numel()
        args, flags = lif_constants(tau, v_threshold, v_reset)
        _launch(_lif_bwd_kernel, n, grad, z, gx, n, *args, alpha, T=z.shape[0], HARD=flags["HARD"],
                DETACH=detach_reset, DECAY_INPUT=decay_input)
        return gx

    @torch.library.custom_op("metamixer::lif_multistep", mutates_args=())
    def _lif_op(x: torch.Tensor, tau: float, v_threshold: float, v_reset: Optional[float], detach_reset: bool,
                decay_input: bool, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return lif_forward_triton(x, tau, v_threshold, v_reset, decay_input)

    @_lif_op.register_fake
    def _(x, tau, v_threshold, v_reset, detach_reset, decay_input, alpha):
        return torch.empty_like(x), torch.empty_like(x, dtype=_z_dtype(x.dtype))

    @torch.library.custom_op("metamixer::lif_multistep_backward", mutates_args=())
    def _lif_bwd_op(grad: torch.Tensor, z: torch.Tensor, tau: float, v_threshold: float, v_reset: Optional[float],
                    detach_reset: bool, decay_input: bool, alpha: float) -> torch.Tensor:
        return lif_backward_triton(grad, z, tau, v_threshold, v_reset, detach_reset, decay_input, alpha, grad.dtype)

    @_lif_bwd_op.register_fake
    def _(grad, z, tau, v_threshold, v_reset, detach_reset, decay_input, alpha):
        return torch.empty_like(z, dtype=grad.dtype)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zeros for z's (absent) gradient
        ctx.params = inputs[1:]

    def _backward(ctx, grad_s, grad_z):
        (z,) = ctx.saved_tensors
        return (_lif_bwd_op(grad_s, z, *ctx.params),) + (None,) * 6

    _lif_op.register_autograd(_backward, setup_context=_setup_context)


    class _LifFunction(torch.autograd.Function):
        """The eager path: the same launchers as the custom op, without its dispatch cost (about 40 us per call
        and direction, measured; Spikformer makes 61 LIF calls per step). ``torch.compile`` gets the custom op."""

        @staticmethod
        def forward(ctx, x, tau, v_threshold, v_reset, detach_reset, decay_input, alpha):
            s, z = lif_forward_triton(x, tau, v_threshold, v_reset, decay_input)
            ctx.save_for_backward(z)
            ctx.params = (tau, v_threshold, v_reset, detach_reset, decay_input, alpha)
            return s

        @staticmethod
        def backward(ctx, grad_s):
            (z,) = ctx.saved_tensors
            return (lif_backward_triton(grad_s, z, *ctx.params, grad_s.dtype),) + (None,) * 6

register_op("lif_multistep", lif_multistep)
