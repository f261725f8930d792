"""``train(cfg)``: what ``python train.py`` runs (instantiate from the Hydra config, fit, report)."""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, Dict, List

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from .checkpoint import AtomicCheckpointIO, load_weights, read_checkpoint
from .cli import remove_run_dir
from .data import ImageDataModule
from .module import ImageClassifier

__all__ = ["train", "instantiate_all", "instantiate_data"]

log = logging.getLogger(__name__)

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


def _check_resume(path: str, num_classes: int, model_name: str, model_kwargs: Dict[str, Any]) -> int:
    """Fail before anything is written if the checkpoint is unreadable or made for another model, architecture or
    class count; return its global step."""
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path={path!r} is not a Lightning checkpoint written by train.py (to start from "
                         f"its weights, pass weights={path} instead)")
    theirs = (hp.get("model_name"), dict(hp.get("model_kwargs") or {}))

    def arch(kwargs):  # dropout / drop-path rates are training settings, free to change on resume
        return {k: v for k, v in kwargs.items() if not k.endswith(("drop_rate", "drop_path_rate"))}

    if (theirs[0], arch(theirs[1])) != (model_name, arch(model_kwargs)):
        raise ValueError(
            f"ckpt_path={path!r} is a checkpoint of {theirs[0]} with model.kwargs={theirs[1]}, but the config builds "
            f"{model_name} with model.kwargs={dict(model_kwargs)}: resume with model={theirs[0]} and the same "
            f"model.kwargs, or, to fine-tune from its weights instead, pass weights={path} (not ckpt_path)")
    if hp.get("num_classes") != num_classes:
        raise ValueError(f"ckpt_path={path!r} was trained for {hp.get('num_classes')} classes but the dataset has "
                         f"{num_classes} (to fine-tune from its weights on this dataset, pass weights={path})")
    return int(ckpt.get("global_step", 0))


def _progress_bar(cfg: DictConfig) -> bool:
    """``trainer.enable_progress_bar``; null means a bar on a terminal and none when stdout is a file or a pipe
    (``EpochLog`` writes one line per epoch either way)."""
    value = cfg.trainer.get("enable_progress_bar")
    return sys.stdout.isatty() if value is None else bool(value)


def _close_loggers(loggers) -> None:
    for lg in loggers:  # wandb keeps writing into the run folder until its run is finished
        exp = getattr(lg, "_experiment", None)
        if exp is not None and hasattr(exp, "finish"):
            exp.finish(exit_code=1)


def train(cfg: DictConfig) -> Dict[str, float]:
    """Build data, model, callbacks, loggers and trainer from ``cfg``, fit (resuming from ``cfg.ckpt_path``) and
    return the final metrics (``val/top1``, ``val_ema/top1``, ``train/img_per_sec``, ... and ``best/<monitor>``).

    A run that fails before its first optimizer step leaves no run folder behind (when it created the folder);
    a run that trained on nothing (no batch, or a finished run resumed) raises instead of returning."""
    state: Dict[str, Any] = {"trainer": None, "loggers": [], "start_step": 0}
    try:
        return _train(cfg, state)
    except BaseException:
        trainer = state["trainer"]
        if trainer is None or trainer.global_step <= state["start_step"]:
            _close_loggers(state["loggers"])
            remove_run_dir(str(cfg.output_dir))
        raise


def _train(cfg: DictConfig, state: Dict[str, Any]) -> Dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_data(cfg.data)
    num_classes = datamodule.num_classes
    model_kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True) if cfg.model.get("kwargs") else {}
    weights = cfg.get("weights")
    if weights and cfg.model.pretrained:
        raise ValueError(f"weights={weights} and model.pretrained=true both set the initial weights: choose one")
    if cfg.get("ckpt_path"):
        state["start_step"] = _check_resume(cfg.ckpt_path, num_classes, cfg.model.name, model_kwargs)
    module = ImageClassifier(
        model_name=cfg.model.name, num_classes=num_classes, pretrained=cfg.model.pretrained,
        model_kwargs=model_kwargs,
        optimizer=OmegaConf.to_container(cfg.optim.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.optim.scheduler, resolve=True),
        **OmegaConf.to_container(cfg.module, resolve=True))
    if weights and not cfg.get("ckpt_path"):  # a resumed run restores its own (trained) weights instead
        source = load_weights(module.model, str(weights))
        if module.ema is not None:
            module.ema.set(module.model)
        log.info("initial weights: %s", source)
    # what the run starts from, for callbacks that care (OFQ warns when it quantizes random weights)
    module.init_weights = ("checkpoint" if cfg.get("ckpt_path") else "weights" if weights
                           else "pretrained" if cfg.model.pretrained else None)
    datamodule.configure(module.model.pretrained_cfg)

    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = state["loggers"] = instantiate_all(cfg.get("logger"))
    if not loggers:  # logger=none: nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=_progress_bar(cfg))
    state["trainer"] = trainer
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    with warnings.catch_warnings():
        # the EMA copy is meant to stay in eval mode; Lightning warns about any module in eval mode at the start
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # checkpoints hold numpy RNG state, which weights_only loading refuses: resume only from files you trust
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)

    if trainer.global_step <= state["start_step"]:
        n = len(datamodule.train_set) if datamodule.train_set is not None else 0
        raise ValueError(
            f"the run trained on nothing: {n} training images, data.batch_size={cfg.data.batch_size}, "
            f"trainer.limit_train_batches={cfg.trainer.get('limit_train_batches')}, epochs "
            f"{trainer.current_epoch}/{trainer.max_epochs}"
            + (f", resumed at step {state['start_step']} (raise trainer.max_epochs to train further)"
               if cfg.get("ckpt_path") else ""))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and getattr(ckpt_cb, "best_model_score", None) is not None:
        metrics[f"best/{ckpt_cb.monitor}"] = float(ckpt_cb.best_model_score)
    if trainer.is_global_zero:
        line = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("val/top1", "val/top5", "val_ema/top1", "train/img_per_sec")
                         if k in metrics)
        log.info(f"[{cfg.model.name} on {cfg.data.name}] epoch {trainer.current_epoch}: {line}"
                 + (f"; best checkpoint {ckpt_cb.best_model_path}" if ckpt_cb is not None and ckpt_cb.best_model_path
                    else ""))
    return metrics
