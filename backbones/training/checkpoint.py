"""Checkpoint files: atomic writes, validated reads, and export to timm's hub format.

Every file this package writes goes to a temporary name in the same folder first and is then renamed over the
target with ``os.replace`` (atomic on POSIX): a process killed mid-write leaves the previous file intact and at most a
stray ``.*.tmp*`` file, never a truncated checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["atomic_write", "AtomicCheckpointIO", "read_checkpoint", "write_json", "export_hub"]


def atomic_write(path: os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp", dir=path.parent)
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
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        save_for_hf(model, tmp, safe_serialization=True, data_config=data_config)
        if out_dir.exists():  # keep the previous export until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old", dir=out_dir.parent))
            os.replace(out_dir, old / "export")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir
