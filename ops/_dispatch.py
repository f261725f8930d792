"""Choosing between an op's plain-PyTorch reference and its Triton kernels.

Every op in ``ops/`` takes ``impl=None|'auto'|'reference'|'triton'``. ``None`` reads the environment variable
``METAMIXER_OPS_IMPL`` (default ``auto``; ``triton`` there takes the kernels wherever one exists for the
arguments, while an explicit ``impl='triton'`` for arguments without a kernel is an error). ``auto`` takes Triton
when the inputs are CUDA tensors, Triton is importable, the op has a kernel for the arguments and the op's
benchmark measured it faster (``preferred``); otherwise the reference. ``triton`` forces the kernels
(also on CPU tensors under ``TRITON_INTERPRET=1``, which is how the test-suite runs them without a GPU).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

ENV_VAR = "METAMIXER_OPS_IMPL"
_CHOICES = ("auto", "reference", "triton")


_TRITON = importlib.util.find_spec("triton") is not None  # a plain constant: torch.compile traces it freely


def triton_available() -> bool:
    return _TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device type while autocast is on there, else None. Device types autocast does
    not know (``meta``, on which timm builds and traces models without memory) count as autocast off instead of
    raising inside ``torch.is_autocast_enabled``."""
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def resolve_impl(impl: Optional[str], x: torch.Tensor, supported: bool = True, preferred: bool = True) -> str:
    """Return ``'reference'`` or ``'triton'`` for an op call on tensor ``x``.

    ``supported`` says whether the op has a Triton kernel for these particular arguments (e.g. stride 1 only).
    ``preferred`` says whether ``auto`` should take it: False where the op's benchmark measured the reference
    (e.g. cuDNN) faster for these arguments. Forcing ``'triton'`` for unsupported arguments is an error rather
    than a silent fallback.
    """
    choice = (impl or os.environ.get(ENV_VAR, "auto")).lower()
    if choice not in _CHOICES:
        raise ValueError(f"impl must be one of {_CHOICES} (or set {ENV_VAR}), got {choice!r}")
    if choice == "reference":
        return "reference"
    if impl is None and choice == "triton" and not supported:
        return "reference"  # the environment switches a whole model: ops without a kernel here keep theirs
    kernel_ok = supported and triton_available() and (x.is_cuda or interpreting())
    if choice == "triton":
        if not supported:
            raise ValueError("the Triton kernel does not support these arguments; use impl='reference'")
        if not kernel_ok:
            raise RuntimeError("impl='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
        return "triton"
    return "triton" if (kernel_ok and preferred and x.is_cuda) else "reference"
