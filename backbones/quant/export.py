"""Export of a quantized model as integer weights + scales, and loading it back for evaluation.

File format (``.safetensors``): for every quantized layer ``L``, ``L.weight.codes`` (int8 integer codes) and
``L.weight.scale`` (fp32, one per output channel) with ``weight = scale * codes`` (StatsQ: odd codes ``2k + 1`` and
``scale = s / 2**bits``, so the levels are ``s * (k + 0.5) / 2**(bits-1)``; LSQ: codes in ``[Qn, Qp]``, ``scale`` =
the step); every other tensor (activation steps, shifts, biases, norms) as stored in the model. The metadata holds
``format='ofq'``, ``model_name``, ``model_kwargs`` and the ``ofq`` quantization config (JSON).
``load_quantized`` rebuilds the model, applies the same layer policy and loads ``scale * codes`` as weights with
the weight quantizers switched off (``deployed``): in fp32 it computes the same logits as the fake-quant model.
QKR attention stores ``W_v`` and the per-head products ``W_qk`` (``<attn>.wv.codes/scale``, ``<attn>.wqk.codes/
scale``; HaloNet also ``<attn>.wq.codes/scale`` for its relative-position logits; StatsQ codes) instead of the
q/k/v weights (DaViT ``qkv.weight``, HaloNet ``q.weight`` and ``kv.weight``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .attention import QKRAttention
from .modules import QuantConfig, quantize_model, quantized_layers

__all__ = ["export_quantized", "export_checkpoint", "is_ofq_export", "load_quantized", "quantize_for_checkpoint"]


@torch.no_grad()
def export_quantized(model: nn.Module, path: os.PathLike, cfg: QuantConfig | Dict, model_name: str,
                     model_kwargs: Optional[Dict[str, Any]] = None) -> None:
    from safetensors.torch import save_file

    cfg = cfg if isinstance(cfg, QuantConfig) else QuantConfig(**cfg)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, m in quantized_layers(model):
        if m.deployed:
            raise ValueError(f"{name} is already deployed; export the training (fake-quant) model")
        codes, scale = m.wq.export(m.raw_weight)
        del sd[f"{name}.weight"]
        sd[f"{name}.weight.codes"] = codes.cpu().contiguous()
        sd[f"{name}.weight.scale"] = scale.cpu().contiguous()
    for name, m in model.named_modules():  # QKR: W_v, the per-head products W_qk (HaloNet: and W_q)
        if isinstance(m, QKRAttention) and m.qkr:
            if m.deployed is not None:
                raise ValueError(f"{name} is already deployed; export the training (fake-quant) model")
            for key, w in m.qkr_weights().items():
                codes, scale = m.v_quant.export(w)
                sd[f"{name}.{key}.codes"] = codes.cpu().contiguous()
                sd[f"{name}.{key}.scale"] = scale.cpu().contiguous()
            for key in m.qkr_keys:  # the q/k/v weights are not needed once these are exported
                del sd[f"{name}.{key}"]
    meta = {"format": "ofq", "model_name": model_name, "model_kwargs": json.dumps(model_kwargs or {}),
            "ofq": json.dumps(cfg.to_dict())}
    save_file(sd, str(path), metadata=meta)


def is_ofq_export(path: os.PathLike) -> bool:
    """Whether ``path`` is a file written by ``export_quantized``."""
    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return False
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("format") == "ofq"


def export_checkpoint(ckpt_path: os.PathLike, out_path: os.PathLike, use_ema: bool = True) -> None:
    """Export a Lightning checkpoint written by ``train.py ... callbacks=ofq`` (EMA weights when present and
    ``use_ema``) as integer weights + scales."""
    import timm

    import backbones  # noqa: F401

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # Lightning checkpoints: trusted files
    if not ckpt.get("ofq"):
        raise ValueError(f"{ckpt_path} was not trained with the OFQ callback (no 'ofq' entry)")
    hp = ckpt["hyper_parameters"]
    kwargs = dict(num_classes=hp["num_classes"], **(hp.get("model_kwargs") or {}))
    model = timm.create_model(hp["model_name"], **kwargs)
    quantize_model(model, ckpt["ofq"])
    sd = ckpt["state_dict"]
    prefix = "ema.module." if use_ema and any(k.startswith("ema.module.") for k in sd) else "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    export_quantized(model, out_path, ckpt["ofq"], hp["model_name"], kwargs)


def load_quantized(path: os.PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """The model of an ``export_quantized`` file, in eval mode, computing with the exported integer weights.
    ``model``: a full-precision model built like the exported one, used instead of ``timm.create_model(model_name,
    **model_kwargs)`` from the metadata (for constructor arguments JSON cannot hold, e.g. HaloNet ``StageCfg``s)."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    import backbones  # noqa: F401  (registers the hub's models)

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "ofq":
        raise ValueError(f"{path} is not an OFQ export (metadata format={meta.get('format')!r})")
    if model is None:
        model = timm.create_model(meta["model_name"], **json.loads(meta["model_kwargs"]))
    quantize_model(model, json.loads(meta["ofq"]))
    sd = load_file(str(path))
    for name, m in quantized_layers(model):
        codes, scale = sd.pop(f"{name}.weight.codes"), sd.pop(f"{name}.weight.scale")
        sd[f"{name}.weight"] = (scale.view(-1, *([1] * (codes.ndim - 1))) * codes.float()).to(m.raw_weight.dtype)
        m.deployed = True
    for name, m in model.named_modules():
        if isinstance(m, QKRAttention) and m.qkr:
            m.deployed = {k: (sd.pop(f"{name}.{k}.scale")[:, None] * sd.pop(f"{name}.{k}.codes").float()).to(w.dtype)
                          for k, w in m.qkr_weights().items()}
            for key in m.qkr_keys:
                sd[f"{name}.{key}"] = torch.zeros_like(m.get_parameter(key))  # unused once deployed
    model.load_state_dict(sd)
    return model.eval()


def quantize_for_checkpoint(model: nn.Module, checkpoint: Dict[str, Any]) -> nn.Module:
    """Apply the OFQ layer policy recorded in a Lightning checkpoint written with the OFQ callback (a no-op for
    other checkpoints): call it before ``model.load_state_dict(checkpoint['state_dict'] ...)``."""
    if isinstance(checkpoint, dict) and checkpoint.get("ofq"):
        quantize_model(model, checkpoint["ofq"])
    return model


if __name__ == "__main__":  # python -m backbones.quant.export CKPT OUT.safetensors [--no-ema]
    import sys

    export_checkpoint(sys.argv[1], sys.argv[2], use_ema="--no-ema" not in sys.argv[3:])
    print(f"wrote {sys.argv[2]}")
