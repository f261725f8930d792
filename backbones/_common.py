"""Small helpers shared by every family: checkpoint unwrapping/validation and input checks.

Kept deliberately small; anything timm or torch already offers is used from there instead.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_function, register_notrace_module
from timm.models import build_model_with_cfg, load_state_dict
from timm.models._features import feature_take_indices

import ops

__all__ = ["OFQ_ATTENTION", "ofq_attention", "unwrap_checkpoint", "check_state_dict", "check_input",
           "stage_intermediates", "read_weights_file", "build_model"]

# Training checkpoints written by timm-style scripts (FFNet, VAN, TransNeXt, OverLoCK releases) pickle the run's
# argparse.Namespace next to the weights. timm downloads pretrained URLs with torch.load(weights_only=True), which
# refuses any class it does not know; a Namespace is plain data, so allow it (tested in tests/test_pretrained_download.py).
# Registered under its name (a (class, name) entry): timm's own loader wraps loads in
# `torch.serialization.safe_globals([argparse.Namespace])`, whose exit removes a plain class entry again.
torch.serialization.add_safe_globals([(argparse.Namespace, "argparse.Namespace")])

# Leaves for torch.fx (timm's FX feature extraction, FX quantization/pruning): the ops' dispatchers branch on device,
# dtype, autocast and shape, which symbolic tracing cannot follow, so a traced graph calls each as one op (which then
# dispatches and checks at run time). DWConv2d is a leaf module for its input check.
for _fn in (ops.dwconv2d, ops.lka, ops.mix_shift, ops.channel_attention, ops.na2d_qk, ops.na2d_av, ops.na2d_rpb,
            ops.na2d_attention, ops.window_attention, ops.aggregated_attention, ops.lif_multistep, ops.halo_attention,
            ops.spiking_attention):
    register_notrace_function(_fn)
register_notrace_module(ops.DWConv2d)

# OFQ kind -> the family attention class that declared it (``ofq_attention``). ``backbones.quant.attention``
# implements each kind; the families declare, next to the class, which of their modules are attention.
OFQ_ATTENTION: Dict[str, type] = {}


def ofq_attention(kind: str) -> Callable[[type], type]:
    """Class decorator: the family's attention module is quantized by OFQ as ``kind`` (``backbones.quant.attention``
    names the quantizer of each kind). The declaration travels with the class, so a renamed or moved class stays
    quantized; a kind OFQ does not implement is an error there, not a silently full-precision attention."""
    def declare(cls: type) -> type:
        known = OFQ_ATTENTION.get(kind, cls)
        if (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"OFQ attention kind {kind!r} is already declared by {OFQ_ATTENTION[kind].__qualname__}")
        OFQ_ATTENTION[kind] = cls
        cls.ofq_kind = kind
        return cls
    return declare


# Nesting keys seen in published checkpoints, in order of preference (EMA first, as timm's loader does).
_NEST_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net", "params")


def unwrap_checkpoint(checkpoint: Mapping[str, Any], prefixes: Iterable[str] = ("module.", "_orig_mod.")) -> Dict[str, Any]:
    """Return the flat ``{name: tensor}`` state_dict inside a published checkpoint.

    Handles the nestings official releases use (``{'model': sd}``, ``{'state_dict': sd}``, EMA copies under
    ``state_dict_ema``/``model_ema``, which are preferred like timm does) and DDP/compile prefixes.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping of parameter names to tensors, got {type(checkpoint).__name__}")
    sd: Mapping[str, Any] = checkpoint
    for _ in range(3):  # nested at most a few levels deep
        nested = next((k for k in _NEST_KEYS if isinstance(sd.get(k), Mapping)), None)
        if nested is None:
            break
        sd = sd[nested]
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    if not any(torch.is_tensor(v) for v in out.values()):
        raise ValueError("checkpoint contains no tensors: is this a model checkpoint?")
    return out


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint") -> None:
    """Raise one clear error naming every missing, unexpected or mis-shaped key.

    Classifier keys may be unexpected (a model built with ``num_classes=0``); shapes of the classifier and first
    conv are not checked: timm's loader adapts those after
    ``checkpoint_filter_fn`` (drops the classifier when ``num_classes`` differs, adapts ``in_chans``).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifiers = []
    for key in ("classifier", "first_conv"):
        v = cfg.get(key) or ()
        classifiers += [v] if isinstance(v, str) else list(v)

    def is_cls(k: str) -> bool:
        return any(k == c or k.startswith(c + ".") for c in classifiers)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected and not is_cls(k)]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and torch.is_tensor(v) and v.shape != expected[k].shape and not is_cls(k)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped key(s): {'; '.join(shapes[:10])}{' ...' if len(shapes) > 10 else ''}")
    if problems:
        name = cfg.get("architecture", type(model).__name__)
        raise ValueError(f"{source} does not match model '{name}': " + " | ".join(problems))


# A leaf for torch.fx (timm's FX feature extraction, FX quantization/pruning): the check branches on the input's
# shape, which symbolic tracing cannot do, so the traced graph calls it as one op and still checks at run time.
# Marked as having a side effect (as torch._assert is) so dead-code elimination keeps it although nothing uses its
# result (FX feature extractors prune the graph).
@torch.fx.node.has_side_effect
@register_notrace_function
def check_input(x: torch.Tensor, in_chans: int, min_size: int = 1, multiple: Optional[int] = None, name: str = "model") -> None:
    """Validate an image batch ``(B, C, H, W)``: channel count and spatial size, with errors that say what to change."""
    if x.ndim != 4:
        raise ValueError(f"{name} expects a 4-D image batch (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{name} was built for in_chans={in_chans} but the input has {x.shape[1]} channels "
            f"(shape {tuple(x.shape)}); pass in_chans={x.shape[1]} to timm.create_model or fix the input")
    h, w = x.shape[-2:]
    if h < min_size or w < min_size:
        raise ValueError(f"{name} needs inputs of at least {min_size}x{min_size} pixels, got {h}x{w}")
    if multiple and (h % multiple or w % multiple):
        raise ValueError(f"{name} needs input height and width divisible by {multiple}, got {h}x{w}")


def stage_intermediates(
        x: torch.Tensor,
        stages: Sequence[nn.Module],
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        intermediates_only: bool = False,
        final_norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        run: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
    """The body of timm's ``forward_intermediates`` for a model that is a stem (already applied to ``x``) followed by
    ``stages``: the outputs of the stages at ``indices`` (``norm=True`` passes the last stage's through
    ``final_norm``) and, unless ``intermediates_only``, the final features (through ``final_norm`` when every stage
    ran). ``run(stage, x)`` replaces ``stage(x)`` where a family runs its stages in a special way."""
    take_indices, max_index = feature_take_indices(len(stages), indices)
    last = len(stages) - 1
    intermediates = []
    for i, stage in enumerate(stages[:max_index + 1] if stop_early else stages):
        x = run(stage, x) if run is not None else stage(x)
        if i in take_indices:
            intermediates.append(final_norm(x) if norm and final_norm is not None and i == last else x)
    if intermediates_only:
        return intermediates
    if final_norm is not None and i == last:
        x = final_norm(x)
    return x, intermediates


def read_weights_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a weights file (``.safetensors`` or a ``torch.save`` checkpoint, loaded with ``weights_only=True``) as
    timm's loader does (EMA / ``state_dict`` / ``model`` nesting unwrapped), with one ``ValueError`` naming the file
    and what is wrong with it instead of the raw unpickling or zip error."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"weights file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"weights file {path!r} is a folder, not a file (an exported model folder loads with "
                         f"timm.create_model('local-dir:{path}', pretrained=True))")
    if os.path.getsize(path) == 0:
        raise ValueError(f"weights file {path!r} is empty")
    try:
        if zipfile.is_zipfile(path):  # torch.save's format: a truncated or damaged archive fails its CRC check
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise ValueError(f"archive member {bad} fails its CRC check")
        state = load_state_dict(path, weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) and zipfile.is_zipfile(path):  # a sound archive with foreign objects inside
            raise ValueError(
                f"weights file {path!r} holds pickled Python objects besides tensors, which weights-only loading "
                "refuses; save the state_dict alone (torch.save(model.state_dict(), path)) or as .safetensors"
            ) from None
        # outside a zip archive, torch's weights-only unpickler reports damaged bytes as "blocked globals": name the
        # damage instead
        detail = "" if "weights_only" in str(e) or not str(e).strip() else f": {str(e).strip().splitlines()[0]}"
        raise ValueError(f"weights file {path!r} is corrupt or not a PyTorch / safetensors checkpoint "
                         f"({type(e).__name__}{detail})") from None
    if not isinstance(state, Mapping) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {path!r} holds no tensors (found {type(state).__name__}): is it a model "
                         "checkpoint?")
    return dict(state)


def build_model(model_cls: type, variant: str, pretrained: bool = False,
                pretrained_filter_fn: Optional[Callable] = None, **kwargs) -> nn.Module:
    """``timm.models.build_model_with_cfg`` for every family's ``_create_*``, with clear errors for a weights file
    given as ``pretrained_cfg_overlay=dict(file=...)``: a missing, corrupt or foreign file raises one ``ValueError``
    naming the file and what is wrong (the file is read once, here, and handed to timm's loader as a state_dict)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = overlay.get("file") if pretrained and overlay.get("source") != "local-dir" else None
    if file:
        if overlay.get("state_dict") is None:  # a state_dict given with the file was read from it already
            kwargs["pretrained_cfg_overlay"] = {**overlay, "state_dict": read_weights_file(file)}
        inner = pretrained_filter_fn

        def pretrained_filter_fn(state_dict, model):
            try:
                return inner(state_dict, model) if inner is not None else state_dict
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                # chained: the cause's traceback tells a foreign file from a bug in the filter
                raise ValueError(f"weights file {file!r} is not a checkpoint of {variant}: {e}") from e
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn,
                                    **kwargs)
    except RuntimeError as e:
        if file and "loading state_dict" in str(e):  # keys that passed the filter but not load_state_dict
            raise ValueError(f"weights file {file!r} does not fit {variant}: {e}") from None
        raise
