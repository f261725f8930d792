"""LightningModule for image classification with any hub (or timm) model.

The loss is cross-entropy with label smoothing on hard targets and soft-target cross-entropy when the data module's
Mixup/CutMix produced soft targets. Models with auxiliary heads (deep supervision: OverLoCK) return plain logits
by default, as every timm model does; a model that has ``set_aux_training`` gets it switched on here, and then returns
``(logits, *aux_logits)`` in training mode. Such a model must define a float attribute ``aux_loss_weight``: the loss is
``CE(logits) + aux_loss_weight * sum(CE(aux) for aux in aux_logits)``, the same criterion (label smoothing / soft
targets) for every head (OverLoCK: 0.4, the official ``--aux-loss-ratio``); in eval mode they return the logits only.

Optimizer and schedule come from timm: ``create_optimizer_v2`` (AdamW by default; its parameter groups put norms,
biases, layer scales and whatever ``model.no_weight_decay()`` names in a group without weight decay) and
``create_scheduler_v2`` (cosine with warm-up) stepped every optimizer update. The EMA (``timm.utils.ModelEmaV3``) is
a submodule, so it is checkpointed with the model and restored on resume; validation reports ``val/*`` for the
model and ``val_ema/*`` for the EMA. Global RNG states (torch, CUDA, numpy, Python) are saved in each checkpoint and
restored on resume, so a resumed run continues the same random stream as an uninterrupted one (single process;
under DDP the checkpoint holds rank 0's state).
"""
from __future__ import annotations

import difflib
import time
from typing import Any, Dict, Optional, Union

import lightning as L
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from timm.layers import freeze_batch_norm_2d
from timm.loss import SoftTargetCrossEntropy
from timm.models import split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["create_model", "ImageClassifier"]


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` after registering the hub's models, with a clear error for an unknown name."""
    import backbones  # noqa: F401  (registers every hub family with timm)

    if ":" not in name:  # 'local-dir:' / 'hf-hub:' sources are resolved by timm
        arch = split_model_name_tag(name)[0]
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown model {name!r}: not a hub or timm model{hint}")
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:  # a keyword the model's constructor does not take (model.kwargs.<typo>=...)
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"model {name!r} does not take that keyword ({e}): check model.kwargs") from None


def _accuracy(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection({
        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
    }, prefix=prefix)


class ImageClassifier(L.LightningModule):
    """Train/validate ``timm.create_model(model_name, num_classes=..., **model_kwargs)``.

    Args:
        model_name / model_kwargs / pretrained: passed to ``timm.create_model``.
        num_classes: classifier outputs (the data module's class count).
        optimizer: ``timm.optim.create_optimizer_v2`` kwargs (opt, lr, weight_decay, layer_decay, betas, ...).
        scheduler: ``timm.scheduler.create_scheduler_v2`` kwargs (sched, warmup_epochs, warmup_lr, min_lr,
            cooldown_epochs, ...); the epoch count and updates per epoch come from the trainer (``cooldown_epochs``
            of the ``max_epochs`` stay at ``min_lr`` after the schedule).
        label_smoothing: for hard targets (the Mixup soft targets carry their own smoothing).
        ema_decay: EMA of the weights with this decay (None or 0: no EMA); ``ema_warmup`` uses timm's decay warm-up.
        channels_last: model and inputs in channels-last memory format.
        compile: run the model through ``torch.compile`` (the state_dict keeps its plain keys): ``True`` for its
            default mode, or a mode name; ``"reduce-overhead"`` replays CUDA graphs, which removes the per-launch
            host time that bounds small models (BENCHMARKS.md: the fastest way to train them on the hub's ops).
        freeze_bn: BatchNorm -> FrozenBatchNorm2d (running statistics, no batch statistics).
    """

    def __init__(
            self,
            model_name: str,
            num_classes: int,
            model_kwargs: Optional[Dict[str, Any]] = None,
            pretrained: bool = False,
            optimizer: Optional[Dict[str, Any]] = None,
            scheduler: Optional[Dict[str, Any]] = None,
            label_smoothing: float = 0.1,
            ema_decay: Optional[float] = None,
            ema_warmup: bool = False,
            channels_last: bool = False,
            compile: Union[bool, str] = False,
            freeze_bn: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        model = create_model(model_name, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
        if freeze_bn:
            model = freeze_batch_norm_2d(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if hasattr(model, "set_aux_training"):  # deep supervision is opt-in (OverLoCK's auxiliary head)
            model.set_aux_training(True)
        self.model = model
        self.ema = ModelEmaV3(model, decay=ema_decay, use_warmup=ema_warmup) if ema_decay else None
        if self.ema is not None:
            self.ema.requires_grad_(False)  # updated by copying, never by the optimizer (and ignored by DDP)
        self._ema_step = -1
        # a plain attribute, not a registered submodule, so the state_dict keeps the model's own keys
        if isinstance(compile, str) and compile not in torch._inductor.list_mode_options():
            raise ValueError(f"module.compile must be true, false or one of torch.compile's modes "
                             f"{sorted(torch._inductor.list_mode_options())}, got {compile!r}")
        mode = compile if isinstance(compile, str) else None
        object.__setattr__(self, "_compiled", torch.compile(model, mode=mode) if compile else None)
        # the modes that replay CUDA graphs (reduce-overhead, max-autotune) need each step marked
        self._cuda_graphs = bool(compile) and torch._inductor.list_mode_options(mode or "default").get(
            "triton.cudagraphs", False)
        self.soft_ce = SoftTargetCrossEntropy()
        self._seen, self._t0, self._t1 = 0, 0.0, 0.0
        self.val_acc = _accuracy(num_classes, "val/")
        self.val_ema_acc = _accuracy(num_classes, "val_ema/") if self.ema is not None else None

    def forward(self, x: torch.Tensor):
        if self._cuda_graphs:  # each step's graph replay may overwrite the previous step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        return (self.model if self._compiled is None else self._compiled)(x)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def _criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2:  # soft targets from Mixup/CutMix
            return self.soft_ce(logits.float(), target)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    # ---- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(self._prep(x))
        if isinstance(out, (tuple, list)):  # (logits, *aux_logits), e.g. OverLoCK after set_aux_training(True)
            weight = getattr(self.model, "aux_loss_weight", None)
            if weight is None:
                raise TypeError(f"{self.hparams.model_name} returned {len(out)} outputs in training mode; a model "
                                "with auxiliary logits must define the attribute `aux_loss_weight`")
            loss = self._criterion(out[0], y) + weight * sum(self._criterion(a, y) for a in out[1:])
        else:
            loss = self._criterion(out, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self._seen += x.shape[0]
        return loss

    # training throughput: images/s over each epoch's training part (data loading included, validation not)
    def on_train_epoch_start(self) -> None:
        self._seen, self._t0, self._t1 = 0, time.perf_counter(), None

    def _stop_clock(self) -> None:
        if self._t1 is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._t1 = time.perf_counter()

    def on_validation_epoch_start(self) -> None:
        self._stop_clock()

    def on_train_epoch_end(self) -> None:
        self._stop_clock()
        if self._seen:
            self.log("train/img_per_sec", self._seen * self.trainer.world_size / (self._t1 - self._t0))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None and self.global_step != self._ema_step:  # once per optimizer update
            self.ema.update(self.model, step=self.global_step)
            self._ema_step = self.global_step

    # ---- validation --------------------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        x = self._prep(x)
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits.float(), y), on_epoch=True, sync_dist=True)
        self.val_acc.update(logits, y)
        self.log_dict(self.val_acc, on_epoch=True, prog_bar=True)
        if self.ema is not None:
            self.val_ema_acc.update(self.ema.module(x), y)
            self.log_dict(self.val_ema_acc, on_epoch=True)

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = create_optimizer_v2(self.model, **(self.hparams.optimizer or {"opt": "adamw"}))
        epochs = self.trainer.max_epochs
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"trainer.max_epochs={epochs!r}: the cosine schedule needs an integer >= 1")
        updates = max(1, int(self.trainer.estimated_stepping_batches) // epochs)
        sched = dict(self.hparams.scheduler or {})
        # timm's cooldown_epochs hold min_lr after the schedule ends, and max_epochs counts the whole run, so the
        # schedule spans max_epochs - cooldown_epochs (timm's train.py runs --epochs E then --cooldown-epochs C:
        # the same run is max_epochs=E+C, cooldown_epochs=C here)
        cooldown = int(sched.get("cooldown_epochs") or 0)
        if not 0 <= cooldown < epochs:
            raise ValueError(f"optim.scheduler.cooldown_epochs={cooldown} must be in [0, trainer.max_epochs={epochs})")
        scheduler, _ = create_scheduler_v2(optimizer, num_epochs=epochs - cooldown, updates_per_epoch=updates,
                                           step_on_epochs=False, **sched)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)

    # ---- exact resume ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["rng_states"] = _collect_rng_states()
        checkpoint["ema_step"] = self._ema_step

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Restored here, before the fit loop creates the first data iterator: in an uninterrupted run nothing draws
        # from the RNG between the checkpoint's save (validation end) and the next epoch's iterator (Lightning's
        # sanity check runs under isolate_rng).
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])
        self._ema_step = checkpoint.get("ema_step", -1)
