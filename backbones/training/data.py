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

Unreadable images (truncated or corrupt files in an image folder or hub dataset) are replaced by the next readable
image of the split and reported: a warning with the file's path, the epoch's count in the epoch log line
(``EpochLog``), and a ``ValueError`` once more than ``max_unreadable`` (a fraction of the split, per epoch) are
unreadable. A training split smaller than one batch trains on one partial batch per epoch (even-sized under
Mixup/CutMix); with fewer than 2 images per process (BatchNorm needs two) it is an error naming the numbers.

Sampling is deterministic per epoch (``seed + epoch``) in one process and across DDP ranks alike: the sampler is a
``DistributedSampler`` built here (the trainer sets ``use_distributed_sampler: false``), so a 2-process run sees the
same global batches as a 1-process run with twice the per-process batch size.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import numpy as np
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from timm.data import ImageDataset, Mixup, create_dataset, create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["CheckedImageDataset", "DigitsDataset", "ImageDataModule", "dataset_num_classes"]

log = logging.getLogger(__name__)


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


class CheckedImageDataset(Dataset):
    """A timm ``ImageDataset`` whose unreadable images are reported, not silently skipped.

    Items are ``(image, target, unreadable)``: ``unreadable`` is ``""`` or, when the image at ``index`` (and maybe
    the ones after it) could not be decoded, one ``"path (error)"`` line per such file; the image returned is then
    the next readable one. The report travels with the batch so that the main process sees it whatever the number
    of loader workers (``ImageDataModule`` strips it before the model sees the batch).
    """

    def __init__(self, base: ImageDataset, max_consecutive: int = 50):
        self.base, self.reader, self.max_consecutive = base, base.reader, max_consecutive
        self.transform = base.transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        base, n, bad = self.base, len(self.base), []
        for attempt in range(min(n, self.max_consecutive)):
            i = (index + attempt) % n
            img, target, *_ = base.reader[i]
            try:
                img = Image.open(img)
                img = img.convert(base.input_img_mode or "RGB")  # decodes the pixels: truncated files fail here
            except Exception as e:  # any decoder error (OSError, SyntaxError, DecompressionBombError, ...)
                bad.append(f"{base.reader.filename(i, absolute=True)} ({type(e).__name__}: {e})")
                continue
            if self.transform is not None:
                img = self.transform(img)
            if target is None:
                target = -1
            elif base.target_transform is not None:
                target = base.target_transform(target)
            return img, target, "\n".join(bad)
        raise ValueError(f"{len(bad)} consecutive unreadable images, from index {index}: " + "; ".join(bad[:3]))


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
            # unreadable images: fail once more than this fraction of a split is unreadable in one epoch
            max_unreadable: float = 0.01,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # train.py logs the whole Hydra config instead
        self.data_config: Optional[Dict[str, Any]] = None
        self.train_set = self.val_set = None
        self.mixup: Optional[Mixup] = None
        # unreadable images reported in the current epoch, per split ("train" / "val"): "path (error)" lines
        self.unreadable: Dict[str, List[str]] = {}
        self._unreadable_epoch: Optional[int] = None
        if (mixup_alpha > 0 or cutmix_alpha > 0) and mixup_mode == "batch" and batch_size % 2:
            raise ValueError(f"data.batch_size={batch_size} is odd, but Mixup/CutMix (data.mixup_alpha / "
                             "data.cutmix_alpha) pair the batch with itself flipped: use an even batch size")
        if not 0.0 <= float(max_unreadable) <= 1.0:
            raise ValueError(f"data.max_unreadable={max_unreadable} must be a fraction in [0, 1]")
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
        try:
            ds = create_dataset(name, root=hp.root, split=split, is_training=is_training, download=hp.download)
        except RuntimeError as e:
            if "Found 0 images" in str(e):  # timm's folder reader on an empty split folder
                raise ValueError(f"data.root={hp.root!r}: no images in split {split!r} ({e})") from None
            raise
        return CheckedImageDataset(ds) if isinstance(ds, ImageDataset) else ds

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
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=self.hparams.seed)
        batch_size, per_process = self.hparams.batch_size, len(sampler)
        if per_process < batch_size:  # fewer images than one batch: one partial batch per epoch instead of none
            # Mixup/CutMix pairs each image with the batch flipped: they need an even batch
            batch_size = per_process - (per_process % 2 if self.mixup is not None else 0)
            if batch_size < 2:
                raise ValueError(
                    f"the training split has {len(self.train_set)} images ({per_process} per process): too few to "
                    f"train on (data.batch_size={self.hparams.batch_size}); at least 2 per process are needed")
            log.warning("the training split has %d images (%d per process), fewer than data.batch_size=%d: "
                        "training on one batch of %d per epoch", len(self.train_set), per_process,
                        self.hparams.batch_size, batch_size)
        # full batches only otherwise: a last batch of 1 breaks BatchNorm, an odd one breaks Mixup
        return self._loader(self.train_set, sampler, batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(self.val_set, sampler, self.hparams.val_batch_size or self.hparams.batch_size, False)

    def take_unreadable(self, batch, split: str):
        """Strip the unreadable-image report from a ``CheckedImageDataset`` batch: warn with each path, count it
        for the epoch and raise once more than ``max_unreadable`` of the split is unreadable. Returns ``(x, y)``."""
        if not (isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[2], (list, tuple))):
            return batch
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self._unreadable_epoch != epoch:  # a new epoch: count afresh
            self.unreadable, self._unreadable_epoch = {}, epoch
        for report in batch[2]:
            for line in filter(None, report.split("\n")):
                self.unreadable.setdefault(split, []).append(line)
                log.warning("unreadable image %s: replaced by the next readable image of the %s split", line, split)
        bad = self.unreadable.get(split, [])
        total = len(self.train_set if split == "train" else self.val_set)
        if len(bad) > self.hparams.max_unreadable * total:
            raise ValueError(
                f"{len(bad)} of the {total} {split} images are unreadable (more than data.max_unreadable="
                f"{self.hparams.max_unreadable} of the split): {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. "
                "Fix or remove these files, or raise data.max_unreadable to go on without them")
        return batch[0], batch[1]

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        training = self.trainer is not None and self.trainer.training
        return self.take_unreadable(batch, "train" if training else "val")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.mixup is not None and self.trainer is not None and self.trainer.training:
            x, y = batch
            batch = self.mixup(x, y)
        return batch
