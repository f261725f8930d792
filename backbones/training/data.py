"""Image classification data for Lightning, on timm's data pipeline.

Datasets (``name``):
  * ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) shipped inside scikit-learn,
    turned into 3-channel PIL images and resized by the transform; a fixed stratified 80/20 split. Needs no files,
    no network: the default data of ``python train.py``.
  * ``imagefolder``: ``root/<train_split>/<class>/*.jpg`` and ``root/<val_split>/...`` (ImageNet layout).
  * ``torch/cifar10``, ``torch/cifar100`` (any ``torch/...`` name of timm's ``create_dataset``), ``download`` flag.
  * ``hfds/<hub dataset>``: Hugging Face datasets through timm's reader.

Transforms come from ``timm.data.create_transform`` with the model's ``pretrained_cfg`` resolved by
``resolve_data_config`` (any key given here overrides it): RandomResizedCrop, flips, RandAugment (``auto_augment``),
random erasing for training; resize + center crop for validation. Mixup/CutMix runs on the device after the batch is
transferred (``on_after_batch_transfer``), only in training, and produces soft targets with label smoothing.

Sampling is deterministic per epoch (``seed + epoch``) in one process and across DDP ranks alike: the sampler is a
``DistributedSampler`` built here (the trainer sets ``use_distributed_sampler: false``), so a 2-process run sees the
same global batches as a 1-process run with twice the per-process batch size.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from timm.data import Mixup, create_dataset, create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["DigitsDataset", "ImageDataModule", "dataset_num_classes"]


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as RGB PIL images (8x8, grey levels 0..16 scaled to 0..255).

    ``split`` is 'train' or 'validation': a stratified 80/20 split with a fixed seed, the same on every machine.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "validation", "val"):
            raise ValueError(f"digits has splits 'train' and 'validation', not {split!r}")
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        idx_train, idx_val = train_test_split(
            np.arange(len(images)), test_size=0.2, random_state=0, stratify=digits.target)
        idx = idx_train if split == "train" else idx_val
        self.images, self.targets = images[idx], digits.target[idx].astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


def dataset_num_classes(ds: Dataset) -> int:
    """Number of classes of a timm / torchvision / digits dataset."""
    reader = getattr(ds, "reader", None)
    for obj, attr in ((reader, "class_to_idx"), (ds, "classes"), (ds, "class_to_idx")):
        v = getattr(obj, attr, None)
        if v:
            return len(v)
    raise ValueError(f"cannot tell the number of classes of {type(ds).__name__}: set data.num_classes")


class ImageDataModule(L.LightningDataModule):
    """See the module docstring. ``batch_size`` is per process (global batch = batch_size x devices x nodes)."""

    def __init__(
            self,
            name: str = "digits",
            root: Optional[str] = None,
            download: bool = False,
            train_split: str = "train",
            val_split: str = "validation",
            num_classes: Optional[int] = None,
            batch_size: int = 64,
            val_batch_size: Optional[int] = None,
            num_workers: int = 0,
            pin_memory: bool = False,
            seed: int = 0,
            # preprocessing: None means "the model's pretrained_cfg"
            input_size: Optional[int] = None,
            interpolation: Optional[str] = None,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            crop_pct: Optional[float] = None,
            crop_mode: Optional[str] = None,
            # training augmentation (timm's create_transform arguments)
            scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3 / 4, 4 / 3),
            hflip: float = 0.5,
            vflip: float = 0.0,
            color_jitter: Optional[float] = 0.4,
            auto_augment: Optional[str] = None,
            re_prob: float = 0.0,
            re_mode: str = "pixel",
            re_count: int = 1,
            # Mixup / CutMix (off when both alphas are 0)
            mixup_alpha: float = 0.0,
            cutmix_alpha: float = 0.0,
            mixup_prob: float = 1.0,
            mixup_switch_prob: float = 0.5,
            mixup_mode: str = "batch",
            label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # train.py logs the whole Hydra config instead
        self.data_config: Optional[Dict[str, Any]] = None
        self.train_set = self.val_set = None
        self.mixup: Optional[Mixup] = None
        self._check_source()

    # ---- configuration -----------------------------------------------------------------------------------------
    def _check_source(self) -> None:
        hp = self.hparams
        if hp.name == "digits":
            return
        if hp.name.lower().startswith("hfds/"):
            return  # the hub name is checked by the datasets library
        if not hp.root:
            raise ValueError(f"data.name={hp.name!r} needs data.root (the dataset folder)")
        if not os.path.isdir(hp.root) and not (hp.name.startswith("torch/") and hp.download):
            raise FileNotFoundError(f"data.root={hp.root!r} does not exist (data.name={hp.name!r})"
                                    + ("; set data.download=true to fetch it" if hp.name.startswith("torch/") else ""))

    def configure(self, pretrained_cfg: Dict[str, Any]) -> Dict[str, Any]:
        """Resolve the preprocessing from the model's ``pretrained_cfg`` and the overrides given here."""
        hp = self.hparams
        args = {k: hp[k] for k in ("interpolation", "mean", "std", "crop_pct", "crop_mode") if hp[k] is not None}
        if hp.input_size is not None:
            args["img_size"] = int(hp.input_size)
        self.data_config = resolve_data_config(args, pretrained_cfg=pretrained_cfg)
        return self.data_config

    def _dataset(self, split: str, is_training: bool):
        hp = self.hparams
        if hp.name == "digits":
            return DigitsDataset(split)
        name = "" if hp.name == "imagefolder" else hp.name
        return create_dataset(name, root=hp.root, split=split, is_training=is_training, download=hp.download)

    @property
    def num_classes(self) -> int:
        if self.hparams.num_classes:
            return int(self.hparams.num_classes)
        if self.val_set is None:
            self.val_set = self._dataset(self.hparams.val_split, False)
        return dataset_num_classes(self.val_set)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data_config is None:
            raise RuntimeError("call ImageDataModule.configure(model.pretrained_cfg) before setup")
        hp, dc = self.hparams, self.data_config
        if self.val_set is None:
            self.val_set = self._dataset(hp.val_split, False)
        self.val_set.transform = create_transform(**dc, is_training=False)
        if stage in (None, "fit"):
            if self.train_set is None:
                self.train_set = self._dataset(hp.train_split, True)
            self.train_set.transform = create_transform(
                input_size=dc["input_size"], is_training=True, interpolation=dc["interpolation"],
                mean=dc["mean"], std=dc["std"], scale=tuple(hp.scale), ratio=tuple(hp.ratio), hflip=hp.hflip,
                vflip=hp.vflip, color_jitter=hp.color_jitter, auto_augment=hp.auto_augment, re_prob=hp.re_prob,
                re_mode=hp.re_mode, re_count=hp.re_count)
            if hp.mixup_alpha > 0 or hp.cutmix_alpha > 0:
                self.mixup = Mixup(mixup_alpha=hp.mixup_alpha, cutmix_alpha=hp.cutmix_alpha, prob=hp.mixup_prob,
                                   switch_prob=hp.mixup_switch_prob, mode=hp.mixup_mode,
                                   label_smoothing=hp.label_smoothing, num_classes=self.num_classes)

    # ---- loaders -----------------------------------------------------------------------------------------------
    def _world(self):
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def _loader(self, ds, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=hp.num_workers,
                          pin_memory=hp.pin_memory, drop_last=drop_last, persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.hparams.seed)
        return self._loader(self.train_set, sampler, self.hparams.batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(self.val_set, sampler, self.hparams.val_batch_size or self.hparams.batch_size, False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.mixup is not None and self.trainer is not None and self.trainer.training:
            x, y = batch
            batch = self.mixup(x, y)
        return batch
