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

``lif_multistep_reference`` is the definition; ``lif_multistep`` is the dispatcher models call (Triton kernels
plug in behind it later); ``MultiStepLIF`` is a parameter-free module around the dispatcher. The reference (a Python
loop over T plus one ``autograd.Function``) traces without graph breaks under ``torch.compile`` (checked with
``fullgraph=True`` on the ``aot_eager`` backend).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ._dispatch import resolve_impl

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


def lif_multistep(x_seq: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                  detach_reset: bool = True, decay_input: bool = True, alpha: float = 4.0,
                  impl: Optional[str] = None) -> torch.Tensor:
    """Dispatcher: Triton kernels on CUDA where available (see ``ops._dispatch``), else the reference."""
    resolve_impl(impl, x_seq, supported=False)  # no Triton kernel yet: validates ``impl``; 'triton' raises clearly
    return lif_multistep_reference(x_seq, tau, v_threshold, v_reset, detach_reset, decay_input, alpha)


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
