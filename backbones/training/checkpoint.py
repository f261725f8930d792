"""Checkpoint files: atomic writes, validated reads, and export to timm's hub format.

Every file this package writes goes to a temporary name in the same folder first and is then renamed over the
target with ``os.replace`` (atomic on POSIX): a process killed mid-write leaves the previous file intact and at most a
stray ``.*.tmp*`` file, never a truncated checkpoint. Files and folders are created with the modes any other file
would get (0666 / 0777 less the umask, so a group-readable umask gives group-readable checkpoints), unlike
``tempfile``'s private 0600 / 0700.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["atomic_write", "AtomicCheckpointIO", "read_checkpoint", "write_json", "export_hub", "load_weights"]


def _temp_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}{os.getpid()}_{secrets.token_hex(4)}"


def _make_temp_file(path: Path):
    """An exclusive new file beside ``path`` with the umask's mode (returns fd, name)."""
    while True:
        tmp = _temp_name(path, "tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue


def _make_temp_dir(path: Path, kind: str) -> Path:
    """An exclusive new folder beside ``path`` with the umask's mode."""
    while True:
        tmp = _temp_name(path, kind)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _make_temp_file(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO plugin whose saves are atomic (``best.ckpt`` / ``last.ckpt`` are never torn)."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def write_json(path: os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def read_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Load a ``torch.save`` or ``.safetensors`` checkpoint on the CPU, with one clear error if it is unreadable.

    Pickled checkpoints are loaded with ``weights_only=False`` (Lightning checkpoints hold RNG and loop state):
    load only files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} "
                         + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise ValueError(f"member {bad} fails its CRC check")
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a checkpoint: {type(e).__name__}: {e}") from e


def export_hub(model: nn.Module, out_dir: os.PathLike, data_config: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (timm's hub layout) so that
    ``timm.create_model("local-dir:<out_dir>")`` rebuilds the model (the same folder can be pushed to the HF hub).

    The folder is written beside the target and swapped in at the end; an existing export is replaced only once
    the new one is complete.
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(out_dir, "tmp")
    try:
        save_for_hf(model, tmp, safe_serialization=True, data_config=data_config)
        if out_dir.exists():  # keep the previous export until the new one is in place
            old = _make_temp_dir(out_dir, "old")
            os.replace(out_dir, old / "export")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def lightning_state_dict(ckpt: Dict[str, Any], use_ema: bool = True) -> Tuple[Dict[str, Any], str]:
    """The model's weights in a ``train.py`` checkpoint, the EMA copy when there is one (and ``use_ema``), and which
    of the two they are (``'EMA'`` or ``'model'``)."""
    sd = ckpt["state_dict"]
    ema = use_ema and any(k.startswith("ema.module.") for k in sd)
    prefix = "ema.module." if ema else "model."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, "EMA" if ema else "model"


def load_weights(model: nn.Module, path: str, use_ema: bool = True) -> str:
    """Load starting weights into ``model`` (fine-tuning, OFQ from a full-precision model) from any of: a ``train.py``
    checkpoint (EMA weights when present), a folder exported by ``export_hub`` / ``eval.py export_dir=``, or an
    official / hub checkpoint file (converted by the family's ``checkpoint_filter_fn``). A classifier trained for
    another number of classes is left at its initialisation, as timm does for pretrained weights. Returns a short
    description of the source; any unusable file raises one ``ValueError`` naming it."""
    import sys

    from timm.models import load_pretrained, model_entrypoint, split_model_name_tag

    from backbones._common import read_weights_file

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture") or type(model).__name__
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
            raise ValueError(f"weights={path!r} is a folder without config.json + model.safetensors (not a model "
                             "exported by eval.py export_dir=)")
        src_arch = json.loads((p / "config.json").read_text()).get("architecture")
        sd, what = read_weights_file(p / "model.safetensors"), f"export {path}"
    else:
        ckpt = read_checkpoint(p) if p.suffix == ".ckpt" else None
        if isinstance(ckpt, dict) and "state_dict" in ckpt and "hyper_parameters" in ckpt:  # train.py checkpoint
            if "ofq" in ckpt:
                raise ValueError(f"weights={path!r} is a quantization-aware (OFQ) checkpoint; start from a "
                                 "full-precision one, or resume it with ckpt_path=")
            src_arch = ckpt["hyper_parameters"].get("model_name")
            sd, which = lightning_state_dict(ckpt, use_ema)
            what = f"{which} weights of {path}"
        else:
            sd, src_arch, what = read_weights_file(p), None, f"checkpoint {path}"
    if src_arch is not None and split_model_name_tag(src_arch)[0] != split_model_name_tag(arch)[0]:
        raise ValueError(f"weights={path!r} holds {src_arch} weights but the model is {arch}: use model={src_arch}")
    try:
        filter_fn = getattr(sys.modules[model_entrypoint(arch).__module__], "checkpoint_filter_fn", None)
    except RuntimeError:  # not a registered name (a local-dir model): the weights must be in the model's own format
        filter_fn = None
    try:
        if filter_fn is not None:  # official key names -> the model's
            sd = filter_fn(sd, model)
        # the classifier's class count, from its weight: a different count than the model's leaves the model's
        # classifier at its initialisation (timm's rule for pretrained weights)
        heads = cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        w = next((sd[f"{h}.weight"] for h in heads if torch.is_tensor(sd.get(f"{h}.weight"))), None)
        cfg.update(state_dict=sd, num_classes=int(w.shape[0]) if w is not None else -1)
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes,
                        in_chans=getattr(model, "in_chans", 3), filter_fn=None)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"weights={path!r} do not fit {arch} with this config's model.kwargs: {e}") from None
    return what
