"""Training and evaluation for hub backbones: Lightning + Hydra (configs in ``conf/``) on timm's data pipeline.

``train.py`` / ``eval.py`` at the repository root are the Hydra entry points; they call ``train`` / ``evaluate``.
"""
from __future__ import annotations

from typing import Optional

from .callbacks import DivergenceError, EpochLog, FiniteGuard
from .checkpoint import AtomicCheckpointIO, atomic_write, export_hub, load_weights, read_checkpoint, write_json
from .cli import run_job, unique_dir
from .data import CheckedImageDataset, DigitsDataset, ImageDataModule
from .evaluate import count_macs, evaluate, load_eval_model, measure_throughput
from .module import ImageClassifier, create_model
from .train import instantiate_all, instantiate_data, train

__all__ = [
    "AtomicCheckpointIO", "CheckedImageDataset", "DigitsDataset", "DivergenceError", "EpochLog", "FiniteGuard",
    "ImageClassifier", "ImageDataModule", "atomic_write", "count_macs", "create_model", "measure_throughput",
    "evaluate", "export_hub", "instantiate_all", "instantiate_data", "load_eval_model", "load_weights",
    "read_checkpoint", "register_model_configs", "run_job", "train", "unique_dir", "write_json",
]


def register_model_configs(conf_dir: Optional[str] = None) -> None:
    """Make ``model=<name>`` work for every hub model: a ``model/<name>`` entry (name, pretrained, kwargs) in
    Hydra's ConfigStore for each registered hub model that has no ``<conf_dir>/model/<name>.yaml``."""
    from pathlib import Path

    import timm
    from hydra.core.config_store import ConfigStore
    from timm.models import model_entrypoint

    import backbones  # noqa: F401

    cs = ConfigStore.instance()
    for name in timm.list_models():
        has_yaml = conf_dir is not None and (Path(conf_dir) / "model" / f"{name}.yaml").exists()
        if model_entrypoint(name).__module__.startswith("backbones.") and not has_yaml:
            cs.store(group="model", name=name, node={"name": name, "pretrained": False, "kwargs": {}})
