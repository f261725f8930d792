"""``evaluate(cfg)``: what ``python eval.py`` runs: accuracy, parameters, GMACs, throughput, JSON, export."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.layers import freeze_batch_norm_2d
from timm.models import get_pretrained_cfg
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.classification import MulticlassAccuracy

from .checkpoint import export_hub, lightning_state_dict, read_checkpoint, write_json
from .cli import remove_run_dir
from .module import create_model
from .train import instantiate_data

__all__ = ["load_eval_model", "count_macs", "measure_throughput", "evaluate"]

def _class_mismatch(what: str, ckpt_classes: Any, num_classes: int) -> ValueError:
    return ValueError(f"{what} has {ckpt_classes} classes but the dataset has {num_classes}: evaluate it on a "
                      "dataset with the same classes")


def load_eval_model(model_name: str, model_kwargs: Optional[Dict[str, Any]], num_classes: int,
                    ckpt: Optional[str] = None, pretrained: bool = False, use_ema: bool = True
                    ) -> Tuple[nn.Module, str]:
    """Build the model to evaluate and say where its weights came from.

    ``ckpt``: a folder exported by ``export_hub`` (config.json + model.safetensors); a Lightning checkpoint from
    ``train.py`` (architecture from its hyper-parameters, EMA weights if present and ``use_ema``); or any other
    checkpoint file, loaded through timm's pretrained path so the family's ``checkpoint_filter_fn`` converts
    official formats. Without ``ckpt``, ``pretrained=True`` loads the model's published weights.
    """
    model_kwargs = dict(model_kwargs or {})
    if ckpt and Path(ckpt).is_dir():
        if not (Path(ckpt) / "config.json").is_file():
            raise FileNotFoundError(f"ckpt={ckpt!r} is a folder without config.json (not an exported model)")
        model = create_model(f"local-dir:{Path(ckpt).resolve()}", pretrained=True)
        if model.num_classes != num_classes:
            raise _class_mismatch(f"exported model {ckpt!r}", model.num_classes, num_classes)
        return model, f"export {ckpt}"
    if ckpt:
        from backbones.quant import is_ofq_export, load_quantized, quantize_for_checkpoint
        if is_ofq_export(ckpt):  # integer weights + scales written by backbones.quant.export
            model = load_quantized(ckpt)
            if model.num_classes != num_classes:
                raise _class_mismatch(f"OFQ export {ckpt!r}", model.num_classes, num_classes)
            return model, f"OFQ export {ckpt}"
        state = read_checkpoint(ckpt)
        hp = state.get("hyper_parameters") if isinstance(state, dict) else None
        if hp and "model_name" in hp and "state_dict" in state:  # Lightning checkpoint from train.py
            if hp["num_classes"] != num_classes:
                raise _class_mismatch(f"checkpoint {ckpt!r}", hp["num_classes"], num_classes)
            model = create_model(hp["model_name"], num_classes=hp["num_classes"], **(hp.get("model_kwargs") or {}))
            if hp.get("freeze_bn"):
                model = freeze_batch_norm_2d(model)
            quantize_for_checkpoint(model, state)  # an OFQ (quantization-aware) run: same quantized layers
            sd, which = lightning_state_dict(state, use_ema)
            model.load_state_dict(sd)
            return model, f"{which} weights of {ckpt}"
        try:  # a hub / official checkpoint: the family's checkpoint_filter_fn converts it
            model = create_model(model_name, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay=dict(state_dict=state, file=str(ckpt),
                                                             num_classes=num_classes),
                                 **model_kwargs)
        except (RuntimeError, ValueError) as e:
            if "size mismatch" in str(e):
                raise _class_mismatch(f"checkpoint {ckpt!r}", "another number of", num_classes) from e
            raise
        return model, f"checkpoint {ckpt}"
    if pretrained:
        create_model(model_name, pretrained=False, **model_kwargs)  # unknown names fail here, before any download
        pretrained_cfg = get_pretrained_cfg(model_name)
        if pretrained_cfg is None:
            raise ValueError(f"{model_name} has no published weights (pretrained_cfg); pass ckpt=PATH")
        cfg_classes = pretrained_cfg.num_classes
        if cfg_classes != num_classes:
            raise _class_mismatch(f"pretrained {model_name}", cfg_classes, num_classes)
        return create_model(model_name, pretrained=True, **model_kwargs), f"pretrained {model_name}"
    raise ValueError("nothing to evaluate: pass ckpt=PATH (Lightning checkpoint, hub checkpoint or exported folder) "
                     "or pretrained=true")


@torch.no_grad()
def count_macs(model: nn.Module, input_size) -> int:
    """Multiply-accumulates of one image, the unit papers and timm's benchmark tables quote as "GMACs" (often
    loosely called FLOPs): half of ``torch.utils.flop_counter``'s total, which counts a multiply-add as 2 FLOPs
    (matmul / conv / attention ops; elementwise ops are not counted)."""
    p = next(model.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops()) // 2


@torch.inference_mode()
def measure_throughput(model: nn.Module, input_size, batch_size: int, device: torch.device, amp: bool = False,
                       channels_last: bool = False, warmup: int = 2, iters: int = 5) -> float:
    """Inference images/s on random input (mean over ``iters`` batches after ``warmup``)."""
    x = torch.randn(batch_size, *input_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for _ in range(warmup):
            model(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
    return batch_size * iters / (time.perf_counter() - t0)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate ``cfg.ckpt`` / ``cfg.pretrained`` on ``cfg.data``'s validation split; print a table, write
    ``cfg.json`` (atomically) and, with ``cfg.export_dir``, the model in timm's hub format. A failed evaluation
    leaves no run folder behind (when it created the folder)."""
    try:
        return _evaluate(cfg)
    except BaseException:
        remove_run_dir(str(cfg.output_dir))
        raise


def _evaluate(cfg: DictConfig) -> Dict[str, Any]:
    datamodule = instantiate_data(cfg.data, val_batch_size=cfg.batch_size)
    num_classes = datamodule.num_classes
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True) if cfg.model.get("kwargs") else {}
    model, source = load_eval_model(cfg.model.name, kwargs, num_classes, ckpt=cfg.ckpt,
                                    pretrained=cfg.pretrained, use_ema=cfg.use_ema)
    data_config = datamodule.configure(model.pretrained_cfg)
    datamodule.setup("validate")
    device = _device(cfg.device)
    model = model.eval().to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    acc = {k: MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device) for k in (1, min(5, num_classes))}
    n = 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        for batch in datamodule.val_dataloader():
            x, y = datamodule.take_unreadable(batch, "val")
            x, y = x.to(device), y.to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            for m in acc.values():
                m.update(logits, y)
            n += len(y)
    input_size = tuple(data_config["input_size"])
    result = {
        "model": model.pretrained_cfg.get("architecture", cfg.model.name),
        "weights": source,
        "dataset": f"{cfg.data.name}:{datamodule.hparams.val_split}",
        "images": n,
        "unreadable_images": len(datamodule.unreadable.get("val", [])),
        "num_classes": num_classes,
        "top1": float(acc[1].compute()) * 100,
        "top5": float(acc[min(5, num_classes)].compute()) * 100,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs": count_macs(model, input_size) / 1e9,
        "input_size": list(input_size),
        "throughput_img_s": measure_throughput(model, input_size, cfg.bench.batch_size, device, amp=cfg.amp,
                                               channels_last=cfg.channels_last, warmup=cfg.bench.warmup,
                                               iters=cfg.bench.iters),
        "device": str(device),
        "bench_batch_size": cfg.bench.batch_size,
        "amp": bool(cfg.amp),
    }
    if cfg.get("export_dir"):
        export_hub(model.float().cpu(), cfg.export_dir, data_config=data_config)
        result["export_dir"] = str(cfg.export_dir)
    write_json(cfg.json, result)
    width = max(len(k) for k in result)
    print("\n".join(f"| {k:<{width}} | {v:.3f} |" if isinstance(v, float) else f"| {k:<{width}} | {v} |"
                    for k, v in result.items()))
    print(f"wrote {cfg.json}")
    return result
