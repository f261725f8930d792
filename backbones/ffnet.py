"""FFNet (MetaMixer) for timm.

Paper: "FFNet: MetaMixer-based Efficient Convolutional Mixer Design" (Yun, Lee, Ro), https://arxiv.org/abs/2406.02021
Official code: https://github.com/ysj9909/FFNet (models/ffnet.py), Apache-2.0.

FFNet is a pure ConvNet built from two residual mixers per block:
  * FFNified attention (token mixer): 1x1 conv+BN ("query-key") -> large-kernel depthwise conv -> GELU ->
    large-kernel depthwise conv ("value"), optionally followed by squeeze-excite;
  * a ConvNeXt-like channel mixer: depthwise conv -> 1x1 expand -> GELU -> 1x1 project.
Depthwise convs of kernel 7 are RepVGG-style (7x7 + 3x3 branches, each with BN) and fuse into one 7x7 conv for
inference: ``model.fuse()`` (the official ``replace_batchnorm``). Every depthwise conv goes through
``ops.dwconv2d`` so the Triton kernels accelerate it.

Hub names: ``ffnet_t/_s/_b/_l`` = the paper's FFNet-1/-2/-3/-4; the official names ``ffnet_1`` .. ``ffnet_4``
resolve to them through timm's deprecation map.

Key layout vs the official code: ``patch_embed`` -> ``stem``; each stage is ``downsample`` + ``blocks``
(official: one Sequential whose element 0 is the PatchMerging); the token-mixer residual's ``0.main`` and
``0.layer_scale`` become ``token_mixer`` and ``ls1.gamma``, its squeeze-excite ``1`` becomes ``se``; the channel
mixer's ``main`` and ``layer_scale`` become ``channel_mixer`` and ``ls2.gamma``; ``head`` -> ``head.fc``. Leaf module
names (``c``/``bn``, ``conv``/``conv1``, ``fc``/``fc1``/``fc2``) are the official ones. ``checkpoint_filter_fn``
converts official checkpoints, unfused or fused.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, LayerScale2d, SEModule, get_device_dtype
from timm.models import (checkpoint_seq, generate_default_cfgs,
                         register_model, register_model_deprecations)

from timm.models._features import feature_take_indices

from ops import DWConv2d

from ._common import build_model, check_input, check_state_dict, stage_intermediates, unwrap_checkpoint

__all__ = ["FFNet"]


def _fuse_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a bias-free conv into (weight, bias)."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A conv with ``conv``'s geometry (depthwise convs stay DWConv2d) holding the given fused weight and bias."""
    dd = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(conv, DWConv2d):
        fused = DWConv2d(conv.in_channels, weight.shape[-1], conv.stride, conv.padding, conv.dilation, bias=True,
                         out_dim=conv.out_channels, **dd)
    else:
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, weight.shape[-2:], conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True, **dd)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused


class ConvBn(nn.Sequential):
    """Bias-free conv followed by BatchNorm (official ``Conv2d_BN``); depthwise convs go through ``ops``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if groups == in_chs and groups > 1:  # depthwise (possibly with a channel multiplier)
            self.c = DWConv2d(in_chs, kernel_size, stride, bias=False, out_dim=out_chs, **dd)
        else:
            self.c = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False,
                               **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        return _conv_like(self.c, *_fuse_bn(self.c.weight, self.bn))


class BnConvSkip(nn.Module):
    """``x + conv1x1(BN(x))`` (official ``Conv2d_BN_skip`` around ``BN_Conv2d``): the downsample's channel mixer."""

    def __init__(self, dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.c = nn.Conv2d(dim, dim, 1, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.bn(x)) + x

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        shift = self.bn.bias - self.bn.running_mean * scale
        w = self.c.weight * scale.reshape(1, -1, 1, 1)
        b = self.c.weight.flatten(1) @ shift
        w = w + torch.eye(w.shape[0], dtype=w.dtype, device=w.device).reshape(w.shape)  # the identity branch
        return _conv_like(self.c, w, b)


class RepDwConv(nn.Module):
    """RepVGG-style depthwise conv: a k x k and a (k//2) x (k//2) branch, each conv+BN, summed (official ``RepVGGDW``).

    ``out_chs`` may be a multiple of ``in_chs`` (groups=in_chs, a channel multiplier), as in the stage transitions.
    """

    def __init__(self, in_chs: int, out_chs: Optional[int] = None, kernel_size: int = 7, stride: int = 1,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        out_chs = out_chs or in_chs
        if out_chs % in_chs:
            raise ValueError(f"depthwise conv needs out_chs to be a multiple of in_chs, got {in_chs} -> {out_chs}")
        self.conv = ConvBn(in_chs, out_chs, kernel_size, stride, groups=in_chs, **dd)
        self.conv1 = ConvBn(in_chs, out_chs, kernel_size // 2, stride, groups=in_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.conv1(x)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        w, b = _fuse_bn(self.conv.c.weight, self.conv.bn)
        w1, b1 = _fuse_bn(self.conv1.c.weight, self.conv1.bn)
        pad = (w.shape[-1] - w1.shape[-1]) // 2
        return _conv_like(self.conv.c, w + F.pad(w1, [pad] * 4), b + b1)


def _dw(dim: int, kernel_size: int, bias_free_bn: bool, **dd) -> nn.Module:
    """The official rule: kernel 7 -> RepVGG branch pair; otherwise a plain depthwise conv (with bias) or conv+BN."""
    if kernel_size == 7:
        return RepDwConv(dim, dim, kernel_size, **dd)
    if bias_free_bn:
        return ConvBn(dim, dim, kernel_size, groups=dim, **dd)
    return DWConv2d(dim, kernel_size, **dd)


class FFNifiedAttention(nn.Module):
    """Token mixer: 1x1 conv+BN -> depthwise conv (ks1) -> act -> depthwise conv (ks2) (official ``Token_Mixer``)."""

    def __init__(self, dim: int, ks1: int, ks2: int, act_layer: type = nn.GELU, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.fc = ConvBn(dim, dim, **dd)
        self.conv1 = _dw(dim, ks1, bias_free_bn=False, **dd)
        self.act = act_layer()
        self.conv2 = _dw(dim, ks2, bias_free_bn=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(self.fc(x))))


class ChannelMixer(nn.Module):
    """Depthwise conv (+BN) -> 1x1 expand -> act -> 1x1 project (official ``Channel_Mixer``)."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float, act_layer: type = nn.GELU, device=None,
                 dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.conv = _dw(dim, kernel_size, bias_free_bn=True, **dd)
        self.fc1 = nn.Conv2d(dim, hidden, 1, **dd)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class FFBlock(nn.Module):
    """``x += ls1 * token_mixer(x)``; ``x = se(x)``; ``x += ls2 * channel_mixer(x)`` (drop-path on both branches)."""

    def __init__(self, dim: int, kernel_size: int, ks1: int, ks2: int, mlp_ratio: float, use_se: bool,
                 act_layer: type, drop_path: float, layer_scale_init_value: Optional[float], device=None,
                 dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.token_mixer = FFNifiedAttention(dim, ks1, ks2, act_layer, **dd)
        self.ls1 = LayerScale2d(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.se = SEModule(dim, rd_ratio=0.25, **dd) if use_se else nn.Identity()
        self.channel_mixer = ChannelMixer(dim, kernel_size, mlp_ratio, act_layer, **dd)
        self.ls2 = LayerScale2d(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(x + self.drop_path(self.ls1(self.token_mixer(x))))
        return x + self.drop_path(self.ls2(self.channel_mixer(x)))


class Downsample(nn.Module):
    """Stride-2 RepVGG depthwise 7x7 (+3x3) widening by a channel multiplier, then ``x + 1x1(BN(x))``
    (official ``PatchMerging``)."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dw = RepDwConv(in_chs, out_chs, 7, stride=2, **dd)
        self.pw = BnConvSkip(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class FFNetStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, kernel_size: int, ks1: int,
                 ks2: int, mlp_ratio: float, use_se: bool, act_layer: type, drop_path: Sequence[float],
                 layer_scale_init_value: Optional[float], device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, out_chs, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            # squeeze-excite only on even block indices, as the official code
            FFBlock(out_chs, kernel_size, ks1, ks2, mlp_ratio, use_se and d % 2 == 0, act_layer, drop_path[d],
                    layer_scale_init_value, **dd)
            for d in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class FFNet(nn.Module):
    """FFNet: stem (two stride-2 3x3 conv+BN with GELU), four stages of FFBlocks, final norm, pooled linear head.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for no classifier).
        embed_dim: width of each stage.
        in_dim: width of the stem's first conv.
        depth: FFBlocks per stage.
        kernel_sizes: channel mixer depthwise kernel per stage.
        kernel_sizes1 / kernel_sizes2: the token mixer's two depthwise kernels per stage.
        use_gelus: GELU (True) or ReLU (False) per stage.
        use_ses: squeeze-excite after the token mixer (even block indices) per stage.
        expansion_ratios: channel mixer expansion per stage.
        use_layer_scale / layer_scale_init_value: per-channel residual scales.
        layer_norm_last: LayerNorm2d (eps 1e-6) instead of BatchNorm2d as the final norm.
        fused: build the re-parameterised inference form directly (to load fused checkpoints).
        global_pool, drop_rate, drop_path_rate: as in timm.
        device, dtype: where and in which dtype the parameters are created (timm's factory keywords).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: Sequence[int] = (64, 128, 320, 512),
            in_dim: int = 64,
            depth: Sequence[int] = (1, 2, 14, 2),
            kernel_sizes: Sequence[int] = (7, 7, 7, 7),
            kernel_sizes1: Sequence[int] = (3, 3, 7, 7),
            kernel_sizes2: Sequence[int] = (3, 3, 7, 7),
            use_gelus: Sequence[bool] = (True, True, True, True),
            use_ses: Sequence[bool] = (False, False, False, False),
            expansion_ratios: Sequence[float] = (3, 3, 3, 3),
            use_layer_scale: bool = False,
            layer_scale_init_value: float = 1e-5,
            layer_norm_last: bool = False,
            fused: bool = False,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        num_stages = len(depth)
        for name, v in dict(embed_dim=embed_dim, kernel_sizes=kernel_sizes, kernel_sizes1=kernel_sizes1,
                            kernel_sizes2=kernel_sizes2, use_gelus=use_gelus, use_ses=use_ses,
                            expansion_ratios=expansion_ratios).items():
            if len(v) != num_stages:
                raise ValueError(f"{name} has {len(v)} entries but depth has {num_stages} stages")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.grad_checkpointing = False

        self.stem = nn.Sequential(ConvBn(in_chans, in_dim, 3, 2, **dd), nn.GELU(),
                                  ConvBn(in_dim, embed_dim[0], 3, 2, **dd))
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depth), device="cpu").split(list(depth))]
        stages, self.feature_info = [], []
        prev, reduction = embed_dim[0], 4
        for i in range(num_stages):
            if i > 0:
                reduction *= 2
            stages.append(FFNetStage(
                prev, embed_dim[i], depth[i], i > 0, kernel_sizes[i], kernel_sizes1[i], kernel_sizes2[i],
                expansion_ratios[i], use_ses[i], nn.GELU if use_gelus[i] else nn.ReLU, dpr[i],
                layer_scale_init_value if use_layer_scale else None, **dd))
            prev = embed_dim[i]
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.stride = reduction
        self.norm = LayerNorm2d(prev, eps=1e-6, **dd) if layer_norm_last else nn.BatchNorm2d(prev, **dd)
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)
        if fused:
            self.fuse()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- re-parameterisation -------------------------------------------------------------------------------
    @torch.no_grad()
    def fuse(self) -> "FFNet":
        """Fold every BN and RepVGG branch into single convs, in place (official ``replace_batchnorm``).

        Use in eval mode: the fused model computes what the unfused one computes with its running BN statistics.
        """
        def _fuse(module: nn.Module) -> None:
            for name, child in module.named_children():
                if hasattr(child, "fuse"):
                    setattr(module, name, child.fuse())
                else:
                    _fuse(child)
        _fuse(self.stem)
        _fuse(self.stages)
        return self

    @property
    def is_fused(self) -> bool:
        return not isinstance(self.stem[0], ConvBn)

    # ---- timm API ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))

    def _check_input(self, x: torch.Tensor) -> None:
        # any size works arithmetically; below the total stride the last stages see 1x1 maps of padding
        check_input(x, self.in_chans, min_size=self.stride, name="FFNet")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (before the final norm; ``norm=True`` applies it to the last one) and the final features."""
        if output_fmt != "NCHW":
            raise ValueError("FFNet's intermediates are NCHW only")
        self._check_input(x)
        x = self.stem(x)
        return stage_intermediates(x, self.stages, indices, norm, stop_early, intermediates_only, final_norm=self.norm)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- checkpoint conversion -----------------------------------------------------------------------------------
_OFFICIAL_RULES = [
    (r"^patch_embed\.", "stem."),
    (r"^(stages\.\d+)\.0\.proj\.0\.", r"\1.downsample.dw."),
    (r"^(stages\.\d+)\.0\.proj\.1\.(conv\.)?", r"\1.downsample.pw."),
    (r"\.token_mixer\.0\.main\.", ".token_mixer."),
    (r"\.token_mixer\.0\.layer_scale$", ".ls1.gamma"),
    (r"\.token_mixer\.1\.", ".se."),
    (r"\.channel_mixer\.main\.", ".channel_mixer."),
    (r"\.channel_mixer\.layer_scale$", ".ls2.gamma"),
    (r"^head\.", "head.fc."),
]


def _official_block_key(k: str) -> str:
    # official stage i>0 holds [PatchMerging, block0, block1, ...]; ours splits downsample and blocks
    def repl(m: re.Match) -> str:
        stage, idx = int(m.group(1)), int(m.group(2))
        return f"stages.{stage}.blocks.{idx - (stage > 0)}."
    return re.sub(r"^stages\.(\d+)\.(\d+)\.(?=token_mixer|channel_mixer)", repl, k)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: FFNet) -> Dict[str, torch.Tensor]:
    """Convert an official FFNet checkpoint (as published: nested under 'model'/'state_dict', unfused or fused).

    A fused checkpoint loaded into an unfused model fuses the model first (the result is the inference form).
    """
    sd = unwrap_checkpoint(state_dict)
    if "stem.0.c.weight" not in sd and "stem.0.weight" not in sd:  # official layout
        out = {}
        for k, v in sd.items():
            k = _official_block_key(k)
            for pattern, repl in _OFFICIAL_RULES:
                k = re.sub(pattern, repl, k)
            if k.endswith((".ls1.gamma", ".ls2.gamma")):
                v = v.reshape(-1)  # official layer scales are (dim, 1, 1)
            out[k] = v
        sd = out
    ckpt_fused = "stem.0.weight" in sd
    if ckpt_fused and not model.is_fused:
        model.fuse()
    elif model.is_fused and not ckpt_fused:
        raise ValueError("this FFNet was built fused (fused=True) but the checkpoint is the unfused training form: "
                         "build it with fused=False, load, then call model.fuse()")
    check_state_dict(sd, model)
    return sd


# ---- variants --------------------------------------------------------------------------------------------------
def _create_ffnet(variant: str, pretrained: bool = False, **kwargs) -> FFNet:
    return build_model(
        FFNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_RELEASE = "https://github.com/ysj9909/FFNet/releases/download/v1.0/"


def _cfg(file: str = "", **kwargs) -> Dict[str, Any]:
    # The official default_cfg: 256x256, bicubic, center crop, ImageNet mean/std; crop_pct 0.9 (FFNet-1/2) or 0.95
    # (FFNet-3/4). The *_384 fine-tunes were evaluated at 384 with crop_pct 1.0: the official train.py sets
    # data_config["crop_pct"] = 1.0 under --finetune, the run that reported 84.5 / 85.3.
    return {
        "url": _RELEASE + file if file else "",
        "num_classes": 1000, "input_size": (3, 256, 256), "pool_size": (8, 8),
        "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.c", "classifier": "head.fc",
        "license": "apache-2.0", "paper_ids": "arXiv:2406.02021",
        "paper_name": "FFNet: MetaMixer-based Efficient Convolutional Mixer Design",
        "origin_url": "https://github.com/ysj9909/FFNet",
        **kwargs,
    }


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
default_cfgs = generate_default_cfgs({
    # official top-1 (ImageNet-1K val) in the comments
    "ffnet_t.in1k": _cfg("ffnet_1.pth.tar"),  # 81.3
    "ffnet_t.in1k_dist": _cfg("ffnet_1_distillation.pth.tar"),  # 82.1
    "ffnet_s.in1k": _cfg("ffnet_2.pth.tar"),  # 82.9
    "ffnet_s.in1k_dist": _cfg("ffnet_2_distillation.pth.tar"),  # 83.7
    "ffnet_b.in1k": _cfg("ffnet_3.pth.tar", crop_pct=0.95),  # 83.9
    "ffnet_b.in1k_dist": _cfg("ffnet_3_distillation.pth.tar", crop_pct=0.95),  # 84.5
    "ffnet_b.in1k_384": _cfg("ffnet_3_384.pth.tar", **_384),  # 84.5
    "ffnet_l.in1k_384": _cfg("ffnet_4_384.pth.tar", **_384),  # 85.3
})


@register_model
def ffnet_t(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-1 (13.8M params)."""
    args = dict(depth=(2, 2, 8, 2), embed_dim=(80, 160, 320, 640), in_dim=64, kernel_sizes=(3, 3, 3, 3))
    return _create_ffnet("ffnet_t", pretrained, **dict(args, **kwargs))


@register_model
def ffnet_s(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-2 (26.9M params)."""
    args = dict(depth=(3, 3, 15, 3), embed_dim=(88, 176, 352, 704), in_dim=64)
    return _create_ffnet("ffnet_s", pretrained, **dict(args, **kwargs))


@register_model
def ffnet_b(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-3 (48.3M params)."""
    args = dict(depth=(4, 4, 22, 5), embed_dim=(96, 192, 384, 768), in_dim=64, use_layer_scale=True,
                layer_scale_init_value=1e-6)
    return _create_ffnet("ffnet_b", pretrained, **dict(args, **kwargs))


@register_model
def ffnet_l(pretrained: bool = False, **kwargs) -> FFNet:
    """FFNet-4 (79.2M params)."""
    args = dict(depth=(4, 4, 27, 3), embed_dim=(128, 256, 512, 1024), in_dim=64, use_layer_scale=True,
                layer_scale_init_value=1e-6)
    return _create_ffnet("ffnet_l", pretrained, **dict(args, **kwargs))


register_model_deprecations(__name__, {
    "ffnet_1": "ffnet_t.in1k",
    "ffnet_2": "ffnet_s.in1k",
    "ffnet_3": "ffnet_b.in1k",
    "ffnet_4": "ffnet_l.in1k_384",
})
