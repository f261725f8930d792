"""Callbacks that keep a careless run from losing work: ``FiniteGuard`` (stop on divergence, never checkpoint
non-finite weights) and ``EpochLog`` (one log line per epoch, the readable record in ``train.log``)."""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, Optional

import lightning as L
import torch

__all__ = ["DivergenceError", "FiniteGuard", "EpochLog"]

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss or the weights became non-finite: the run stops; the checkpoints on disk are the last finite ones."""


def _first_non_finite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    floats = [(k, v) for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return None
    # one fused multi-tensor reduction and a single host sync; a non-finite value makes its tensor's norm non-finite
    with torch.no_grad():
        norms = torch._foreach_norm([v.detach() for _, v in floats])
        norms = torch.stack([n.float().to(floats[0][1].device) for n in norms])
    bad = (~torch.isfinite(norms)).nonzero()
    return floats[int(bad[0])][0] if len(bad) else None


class FiniteGuard(L.Callback):
    """Stop the run at the first non-finite training loss, or non-finite weight after an optimizer step, with a
    message naming the step and the remedy; refuse to save a checkpoint that holds non-finite values, so
    ``best.ckpt`` / ``last.ckpt`` keep the last finite weights.

    Args:
        check_weights_every_n_steps: also scan the weights after every n-th optimizer step (0: only the loss every
            step, and the weights whenever a checkpoint is about to be written).
    """

    def __init__(self, check_weights_every_n_steps: int = 1):
        self.every = int(check_weights_every_n_steps)
        self._checked_step = -1

    def _stop(self, trainer: L.Trainer, what: str, step: Optional[int] = None) -> None:
        clip = getattr(trainer, "gradient_clip_val", None)
        remedy = ("lower the learning rate (optim.optimizer.lr=...)"
                  + (", clip gradients (trainer.gradient_clip_val=1.0)" if not clip else
                     f" or clip gradients harder (trainer.gradient_clip_val is {clip})")
                  + ", or use a longer warm-up (optim.scheduler.warmup_epochs=...)")
        raise DivergenceError(
            f"training diverged: {what} at step {trainer.global_step if step is None else step} (epoch "
            f"{trainer.current_epoch}); the run "
            f"stops and the checkpoints already written keep the last finite weights. Remedy: {remedy}")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # before the backward pass and the optimizer step: the weights in memory are still the last finite ones
        if not bool(torch.isfinite(loss.detach()).all()):
            self._stop(trainer, f"the training loss is {float(loss.detach().float().sum())}", trainer.global_step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step != self._checked_step:  # once per optimizer step
            self._checked_step = step
            bad = _first_non_finite(dict(pl_module.named_parameters()))
            if bad is not None:
                self._stop(trainer, f"parameter {bad} is non-finite after the optimizer step")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        bad = _first_non_finite(checkpoint.get("state_dict", {}))
        if bad is not None:
            self._stop(trainer, f"{bad} is non-finite in the checkpoint about to be written (not written)")


class EpochLog(L.Callback):
    """One INFO line per epoch (mean training loss, validation metrics, images/s, time, unreadable images), through
    ``logging``: it reaches the console and Hydra's ``train.log`` whether or not a progress bar is shown."""

    def __init__(self):
        self._loss_sum: Optional[torch.Tensor] = None
        self._batches = 0
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._loss_sum, self._batches, self._t0 = None, 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", f"step {trainer.global_step}"]
        if self._batches:
            parts.append(f"train/loss {float(self._loss_sum) / self._batches:.4f}")
        m = trainer.callback_metrics
        for k in ("val/loss", "val/top1", "val/top5", "val_ema/top1", "train/img_per_sec"):
            if k in m and m[k].numel() == 1 and math.isfinite(float(m[k])):
                parts.append(f"{k} {float(m[k]):.4f}")
        dm = trainer.datamodule
        unreadable = getattr(dm, "unreadable", None) if dm is not None else None
        if unreadable:
            parts.append(f"unreadable images {sum(len(v) for v in unreadable.values())}")
        parts.append(f"{time.perf_counter() - self._t0:.1f}s")
        log.info(", ".join(parts))
