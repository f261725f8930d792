"""Weight oscillation metric and confidence-guided annealing (CGA).

Oscillation (Nagel et al. 2022, "Overcoming oscillations in quantization-aware training"; OFQ's
``TrackOscillation``): after every optimizer update, for each quantized weight take its integer code ``w_int``;
``delta = round(prev_int - w_int)``; a weight *oscillates* at this update when the sign of ``delta`` is opposite
to the sign of its last non-zero change. ``freq = momentum * oscillated + (1 - momentum) * freq`` (an EMA,
momentum 0.01); the logged *oscillating fraction* is the fraction of weights with ``freq > threshold``, and the
*oscillation rate* the fraction of weights that oscillate at an update (averaged over the epoch when logged).

CGA (OFQ, ``cga.py``): in the final phase, a weight is left free only when its pre-rounding level position lies
within ``0.5 +- boundary_range`` of a rounding boundary between two levels in use (``i + 0.5`` for ``i`` from the
tensor's smallest to its largest code minus one); every other weight is frozen: its gradient is zeroed before the
optimizer step and its value restored after the step (so momentum and weight decay cannot move it). The mask is
re-evaluated at every step.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = ["OscillationTracker", "cga_free_mask"]


class OscillationTracker:
    """EMA oscillation frequency of one integer tensor (state is a dict of tensors, for checkpoints)."""

    def __init__(self, momentum: float = 0.01):
        self.momentum = momentum
        self.state: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, w_int: torch.Tensor) -> int:
        """Record one update; returns how many weights oscillated at it."""
        st = self.state
        if not st:
            st.update(prev=w_int.clone(), dir=torch.zeros_like(w_int), freq=torch.zeros_like(w_int, dtype=torch.float32))
            return 0
        delta = torch.round(st["prev"] - w_int)
        switch = torch.sign(delta)
        oscillated = (st["dir"] * switch) == -1
        st["freq"].mul_(1 - self.momentum).add_(oscillated.float(), alpha=self.momentum)
        st["dir"] = torch.where(delta != 0, switch, st["dir"])
        st["prev"] = w_int.clone()
        return int(oscillated.sum())

    def frequency(self) -> Optional[torch.Tensor]:
        return self.state.get("freq")


@torch.no_grad()
def cga_free_mask(levels: torch.Tensor, boundary_range: float = 0.005) -> torch.Tensor:
    """True where a weight stays trainable under CGA: ``0.5 - br <= levels - i <= 0.5 + br`` for some boundary
    index ``i`` in ``[min(round(levels)), max(round(levels)))``; ``levels`` is the quantizer's
    ``levels_before_round(w)`` (official: ``clamp(w / s, -1, 1 - 1e-6) * n - 0.5`` for StatsQ)."""
    r = torch.round(levels)
    i = torch.round(levels - 0.5)  # the only boundary index that can be within +-br < 0.5 of levels - 0.5
    d = levels - i
    return (d <= 0.5 + boundary_range) & (d >= 0.5 - boundary_range) & (i >= r.min()) & (i < r.max())
