"""OFQ's quantizers as modules: StatsQ (weights), LSQ (activations; weights of the 8-bit stem/head and the LSQ
weight baseline) and the learnable shift biases placed before and after each activation quantizer.

Semantics follow nbasyl/OFQ (``src/quantization/quantizer/{statsq,lsq}.py``, ``modules/qbias.py``); the arithmetic
lives in ``ops/fake_quant.py`` (reference + Triton kernels).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ops.fake_quant import lsq_fake_quant, lsq_range, statsq_fake_quant, statsq_scale

__all__ = ["StatsQ", "LSQQuantizer", "LearnableShift"]

# set (to a set of layer ids) during quantize_model's dry run: LSQ quantizers pass their input through and
# initialise nothing, quantized layers record that they were called
PROBE: Optional[set] = None


class StatsQ(nn.Module):
    """Statistics-based weight quantizer: per output channel scale ``2*mean|W|`` (detached), clip to +-1 of it,
    ``2**bits`` half-integer levels, identity straight-through gradient. No parameters."""

    def __init__(self, bits: int):
        super().__init__()
        if bits < 2:
            raise ValueError(f"StatsQ needs bits >= 2, got {bits}")
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return statsq_fake_quant(w, self.bits)

    @torch.no_grad()
    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """Level index ``k`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` of every weight (``w_q = s * (k + 0.5) / n``)."""
        return self.levels_before_round(w).round()

    @torch.no_grad()
    def levels_before_round(self, w: torch.Tensor) -> torch.Tensor:
        """``clamp(w / s, -1, 1 - 1e-6) * n - 0.5`` (what CGA and the oscillation metric look at), fp32."""
        n = float(2 ** (self.bits - 1))
        return torch.clamp(w.float() / statsq_scale(w), -1.0, 1.0 - 1e-6) * n - 0.5

    @torch.no_grad()
    def export(self, w: torch.Tensor):
        """``(codes, scale)`` with ``w_q = scale * codes``: odd integers ``2k + 1`` (int8) and ``s / 2**bits``."""
        return (2 * self.integers(w) + 1).to(torch.int8), statsq_scale(w).flatten() / 2 ** self.bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class LSQQuantizer(nn.Module):
    """Learned step size quantizer with OFQ's initialisation and gradient scaling.

    ``channels`` step sizes along ``dim`` of the input (``dim=None``: one step). The step is initialised from the
    first input it sees (``2 * mean|x| / sqrt(Qp)`` signed, ``4 * mean|x| / sqrt(Qp)`` unsigned, the mean taken
    per step; averaged over ranks under DDP) and its gradient is scaled by ``1 / sqrt(Qp * elements per step)``
    (elements of the global batch under DDP: see ``grad_scale``).
    ``signed=None`` decides the sign once, at initialisation, by the official image-input rule (signed iff
    ``min(x) < -1e-5``). The decision and the initialisation are buffers, so a resumed run does not redo them.

    ``torch.compile``: the forward reads both flags from a Python-side cache (filled from the buffers on first use,
    refreshed by ``init_from`` and ``load_state_dict``), so an initialised quantizer traces without a graph break.
    The first-batch initialisation itself (a data-dependent branch, ``.item()`` and, under DDP, collectives) is
    eager-only: run one eager forward (the OFQ callback does, on the first batch) before compiling.
    """

    def __init__(self, bits: int, channels: int = 1, dim: Optional[int] = None, signed: Optional[bool] = True):
        super().__init__()
        if dim is None and channels != 1:
            raise ValueError("a per-tensor quantizer (dim=None) has one step")
        lsq_range(bits, True)
        self.bits, self.dim = bits, dim
        self.step = nn.Parameter(torch.ones(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed_state", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))
        self._flags = None  # (initialized, signed_state) as Python values: see the class doc (torch.compile)

    def _cached_flags(self):
        if self._flags is None:
            self._flags = (bool(self.initialized), int(self.signed_state))
        return self._flags

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._flags = None

    @property
    def signed(self) -> bool:
        return self._cached_flags()[1] != 0

    @property
    def qrange(self):
        return lsq_range(self.bits, self.signed)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.signed_state.item() < 0:
            neg = (x.min() < -1e-5).float()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(neg, op=dist.ReduceOp.MAX)
            self.signed_state.fill_(int(neg.item()))
            self._flags = None
        qp = self.qrange[1]
        if self.dim is None:
            mean = x.abs().mean().reshape(1)
        else:
            mean = x.abs().transpose(0, self.dim % x.ndim).reshape(x.shape[self.dim], -1).mean(1)
        init = (2.0 if self.signed else 4.0) * mean / math.sqrt(qp)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(init)
            init /= dist.get_world_size()
        self.step.copy_(init)
        self.initialized.fill_(True)
        self._flags = None

    def grad_scale(self, x: torch.Tensor) -> float:
        """``1 / sqrt(Qp * elements per step)``, the elements counted over the global batch under DDP (``x.numel()
        * world size``), so that W processes at batch b train exactly like one process at batch W*b. The official
        code counts the elements of the process's own batch (on W GPUs its step gradients are sqrt(W) larger);
        with one process both are the same."""
        n = x.numel()
        if dist.is_available() and dist.is_initialized():
            n *= dist.get_world_size()
        return 1.0 / math.sqrt(self.qrange[1] * n / self.step.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if PROBE is not None:
            return x
        if not self._cached_flags()[0]:
            self.init_from(x)
        return lsq_fake_quant(x, self.step, self.bits, self.signed, self.dim, self.grad_scale(x))

    @torch.no_grad()
    def levels_before_round(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(x / s, Qn, Qp)`` in fp32: rounding it gives the integer codes."""
        qn, qp = self.qrange
        shape = [1] * x.ndim
        if self.dim is not None:
            shape[self.dim] = -1
        return torch.clamp(x.float() / self.step.detach().float().clamp_min(1e-5).view(shape), qn, qp)

    @torch.no_grad()
    def integers(self, x: torch.Tensor) -> torch.Tensor:
        return self.levels_before_round(x).round()

    @torch.no_grad()
    def export(self, w: torch.Tensor):
        """``(codes, scale)`` with ``w_q = scale * codes`` (int8 codes; per-channel scale along ``dim``)."""
        return self.integers(w).to(torch.int8), self.step.detach().float().clamp_min(1e-5)

    def extra_repr(self) -> str:
        s = {-1: "auto", 0: "False", 1: "True"}[int(self.signed_state)]
        return f"bits={self.bits}, channels={self.step.numel()}, dim={self.dim}, signed={s}"


class LearnableShift(nn.Module):
    """OFQ's ``LearnableBias``: ``x + b`` with one learnable value per channel along ``dim`` (zeros at start)."""

    def __init__(self, channels: int, dim: int = -1):
        super().__init__()
        self.dim = dim
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.dim] = -1
        return x + self.bias.view(shape).to(x.dtype)
