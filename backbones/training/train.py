"""``train(cfg)``: what ``python train.py`` runs (instantiate from the Hydra config, fit, report)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from .checkpoint import AtomicCheckpointIO, read_checkpoint
from .data import ImageDataModule
from .module import ImageClassifier

__all__ = ["train", "instantiate_all", "instantiate_data"]

def instantiate_all(group: DictConfig | None) -> List[Any]:
    """Instantiate every entry of a config group that has a ``_target_`` (callbacks, loggers)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def instantiate_data(cfg: DictConfig, **kwargs) -> ImageDataModule:
    """Instantiate the data module; its own errors (missing root, bad split) surface as themselves, not wrapped
    in Hydra's InstantiationException."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError)):
            raise e.__cause__ from None
        raise


def _check_resume(path: str, num_classes: int) -> None:
    """Fail before anything is written if the checkpoint is unreadable or made for another class count."""
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters")
    if "state_dict" not in ckpt or not hp:
        raise ValueError(f"ckpt_path={path!r} is not a Lightning checkpoint written by train.py")
    if hp.get("num_classes") != num_classes:
        raise ValueError(f"ckpt_path={path!r} was trained for {hp.get('num_classes')} classes but the dataset has "
                         f"{num_classes}")


def train(cfg: DictConfig) -> Dict[str, float]:
    """Build data, model, callbacks, loggers and trainer from ``cfg``, fit (resuming from ``cfg.ckpt_path``) and
    return the final metrics (``val/top1``, ``val_ema/top1``, ``train/img_per_sec``, ... and ``best/<monitor>``)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_data(cfg.data)
    num_classes = datamodule.num_classes
    if cfg.get("ckpt_path"):
        _check_resume(cfg.ckpt_path, num_classes)
    module = ImageClassifier(
        model_name=cfg.model.name, num_classes=num_classes, pretrained=cfg.model.pretrained,
        model_kwargs=OmegaConf.to_container(cfg.model.kwargs, resolve=True) if cfg.model.get("kwargs") else {},
        optimizer=OmegaConf.to_container(cfg.optim.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        **OmegaConf.to_container(cfg.module, resolve=True))
    datamodule.configure(module.model.pretrained_cfg)

    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = instantiate_all(cfg.get("logger"))
    if not loggers:  # logger=none: nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    with warnings.catch_warnings():
        # the EMA copy is meant to stay in eval mode; Lightning warns about any module in eval mode at the start
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # checkpoints hold numpy RNG state, which weights_only loading refuses: resume only from files you trust
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and getattr(ckpt_cb, "best_model_score", None) is not None:
        metrics[f"best/{ckpt_cb.monitor}"] = float(ckpt_cb.best_model_score)
    if trainer.is_global_zero:
        line = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("val/top1", "val/top5", "val_ema/top1", "train/img_per_sec")
                         if k in metrics)
        print(f"[{cfg.model.name} on {cfg.data.name}] epoch {trainer.current_epoch}: {line}"
              + (f"; best checkpoint {ckpt_cb.best_model_path}" if ckpt_cb is not None and ckpt_cb.best_model_path
                 else ""))
    return metrics
