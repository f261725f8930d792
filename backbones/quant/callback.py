"""``OFQ``: oscillation-free quantization-aware training as a Lightning callback (``callbacks=ofq``).

Hooks (no change to the training loop):
  * ``setup``: swaps quantized layers into ``pl_module.model`` (and into the EMA copy ``pl_module.ema.module``)
    before Lightning restores a checkpoint and builds the optimizer, so the quantizer parameters are optimised,
    checkpointed and restored like any other parameter;
  * ``on_train_batch_start`` (first batch of a fresh run): initialises every LSQ step from that batch in eval mode
    without gradients (the official ``setup_alpha``) and copies the quantizer state into the EMA copy; it calls
    the plain ``pl_module.model``, so with ``module.compile=true`` the compiled graph only ever sees initialised
    quantizers (no graph break: see ``LSQQuantizer``);
  * ``on_before_optimizer_step`` / ``on_train_batch_end`` during the last ``cga_epochs`` epochs: CGA freezing
    (gradients of frozen weights zeroed, their values restored after the step);
  * ``on_train_batch_end``: oscillation tracking of every target-bit weight, logged as ``ofq/osc_frac`` (fraction of
    weights whose oscillation frequency exceeds ``osc_threshold``), ``ofq/osc_freq`` (mean frequency),
    ``ofq/osc_rate`` (fraction of weights oscillating at this update; its epoch mean is the per-epoch rate) and, in the
    CGA phase, ``ofq/cga_frozen`` (fraction of frozen weights);
  * ``on_save_checkpoint``: writes the quantization config under ``checkpoint["ofq"]`` (what eval needs to rebuild
    the quantized model); the callback's own state (oscillation EMAs) is saved and restored by Lightning.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import lightning as L
import torch
import torch.nn as nn

from .modules import QUANT_LAYERS, QuantConfig, quantize_model, quantized_layers
from .attention import QKRAttention
from .oscillation import OscillationTracker, cga_free_mask
from .quantizers import LSQQuantizer

__all__ = ["OFQ"]

log = logging.getLogger(__name__)


def _lsq_quantizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LSQQuantizer)]


class OFQ(L.Callback):
    def __init__(self, wbits: int = 4, abits: int = 4, weight_quantizer: str = "statsq", edge_bits: int = 8,
                 edge_layers: Optional[List[str]] = None, include: Optional[List[str]] = None,
                 exclude: Optional[List[str]] = None, unsigned_inputs: Optional[List[str]] = None,
                 qkv_outputs: Optional[List[str]] = None, act_granularity: str = "channel",
                 attn_probs: bool = True, qkr: bool = False, cga_epochs: int = 0, boundary_range: float = 0.005,
                 osc_momentum: float = 0.01, osc_threshold: float = 0.005, track_oscillation: bool = True):
        kw = dict(wbits=wbits, abits=abits, weight_quantizer=weight_quantizer, edge_bits=edge_bits,
                  edge_layers=list(edge_layers) if edge_layers is not None else None,
                  act_granularity=act_granularity, attn_probs=attn_probs, qkr=qkr)
        for k, v in dict(include=include, exclude=exclude, unsigned_inputs=unsigned_inputs,
                         qkv_outputs=qkv_outputs).items():
            if v is not None:
                kw[k] = list(v)
        self.cfg = QuantConfig(**kw)
        self.cga_epochs, self.boundary_range = cga_epochs, boundary_range
        self.osc_momentum, self.osc_threshold, self.track = osc_momentum, osc_threshold, track_oscillation
        self.trackers: Dict[str, OscillationTracker] = {}
        self._frozen: Dict[str, tuple] = {}
        self._tracked_step = -1
        self._calibrated = False
        self.roles: Dict[str, str] = {}

    # ---- model surgery -----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        if any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
            return
        self.roles = quantize_model(model, self.cfg)
        weight_only = [n for n, r in self.roles.items() if r == "weight_only"]
        if weight_only:
            log.warning("OFQ: %d layers are never called (a fused op reads their weights): their weights are "
                        "quantized, their inputs are not: %s", len(weight_only), ", ".join(weight_only))
        ema = getattr(pl_module, "ema", None)
        if ema is not None:
            quantize_model(ema.module, self.cfg)
            ema.requires_grad_(False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # From here on Lightning knows the resumed checkpoint (a resumed run restores trained weights); train.py
        # sets `init_weights` when it loads weights, `pretrained` is the module's own hyperparameter.
        hparams = getattr(pl_module, "hparams", {})
        if not (trainer.ckpt_path or getattr(pl_module, "init_weights", None) or hparams.get("pretrained")):
            log.warning("OFQ starts from randomly initialised weights: quantization-aware training is meant to "
                        "fine-tune a trained full-precision model; pass weights=PATH (a train.py .ckpt, an exported "
                        "folder or an official checkpoint file) or model.pretrained=true")

    def _block_layers(self, pl_module):
        return [(n, m) for n, m in quantized_layers(pl_module.model) if m.role == "block"]

    # ---- LSQ initialisation from the first batch ---------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        model = pl_module.model
        if self._calibrated or all(bool(q.initialized) for q in _lsq_quantizers(model)):
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(batch[0])
        model.train(was_training)
        self._calibrated = True
        ema = getattr(pl_module, "ema", None)
        if ema is not None:
            with torch.no_grad():
                for src, dst in zip(_lsq_quantizers(model), _lsq_quantizers(ema.module)):
                    dst.load_state_dict(src.state_dict())

    # ---- CGA -----------------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        for m in pl_module.model.modules():  # QKR: CGA inside the W_qk quantizer (official)
            if isinstance(m, QKRAttention):
                m.cga_active, m.boundary_range = self._cga_active(trainer), self.boundary_range

    def _cga_active(self, trainer) -> bool:
        return self.cga_epochs > 0 and trainer.current_epoch >= (trainer.max_epochs or 0) - self.cga_epochs

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._frozen = {}
        if not self._cga_active(trainer):
            return
        frozen = total = 0
        for name, m in self._block_layers(pl_module):
            w = m.raw_weight
            freeze = ~cga_free_mask(m.wq.levels_before_round(w), self.boundary_range)
            if w.grad is not None:
                w.grad.masked_fill_(freeze, 0)
            self._frozen[name] = (freeze, w.detach().clone())
            frozen += int(freeze.sum())
            total += freeze.numel()
        pl_module.log("ofq/cga_frozen", frozen / max(total, 1), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._frozen:
            with torch.no_grad():
                for name, m in self._block_layers(pl_module):
                    if name in self._frozen:
                        freeze, saved = self._frozen[name]
                        m.raw_weight.copy_(torch.where(freeze, saved, m.raw_weight))
            self._frozen = {}
        if self.track and trainer.global_step != self._tracked_step:  # once per optimizer update
            self._tracked_step = trainer.global_step
            osc = n = events = 0
            freq_sum = 0.0
            for name, m in self._block_layers(pl_module):
                tr = self.trackers.setdefault(name, OscillationTracker(self.osc_momentum))
                events += tr.update(m.wq.integers(m.raw_weight))
                f = tr.frequency()
                osc += int((f > self.osc_threshold).sum())
                freq_sum += float(f.sum())
                n += f.numel()
            pl_module.log("ofq/osc_frac", osc / max(n, 1), on_step=True, on_epoch=True)
            pl_module.log("ofq/osc_freq", freq_sum / max(n, 1), on_step=True, on_epoch=True)
            pl_module.log("ofq/osc_rate", events / max(n, 1), on_step=True, on_epoch=True)

    def oscillating_fraction(self) -> float:
        """Fraction of tracked weights whose oscillation frequency exceeds ``osc_threshold`` (now)."""
        fs = [t.frequency() for t in self.trackers.values() if t.frequency() is not None]
        n = sum(f.numel() for f in fs)
        return sum(int((f > self.osc_threshold).sum()) for f in fs) / max(n, 1)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        checkpoint["ofq"] = self.cfg.to_dict()

    def state_dict(self) -> Dict[str, Any]:
        return {"trackers": {k: dict(t.state) for k, t in self.trackers.items()}, "tracked_step": self._tracked_step}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.trackers = {}
        for k, st in state_dict.get("trackers", {}).items():
            t = OscillationTracker(self.osc_momentum)
            t.state = dict(st)
            self.trackers[k] = t
        self._tracked_step = state_dict.get("tracked_step", -1)
