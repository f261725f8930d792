"""VAN (Visual Attention Network) for timm.

Paper: "Visual Attention Network" (Guo, Lu, Liu, Cheng, Hu), https://arxiv.org/abs/2202.09741
Official code: https://github.com/Visual-Attention-Network/VAN-Classification (models/van.py), Apache-2.0.

A four-stage pyramid ConvNet. Each stage: an overlapping patch embedding (conv k7 s4 for the first stage, k3 s2
after, then BatchNorm), blocks, and a LayerNorm over channels. Each block is two pre-norm (BatchNorm) residual
branches with per-channel layer scales:
  * spatial attention: 1x1 conv -> GELU -> Large Kernel Attention -> 1x1 conv, plus a shortcut from the branch
    input (the BN-normed x, as the official code does);
  * MLP: 1x1 conv -> depthwise 3x3 conv -> GELU -> 1x1 conv.
Large Kernel Attention (dw 5x5 -> dw 7x7 dilation 3 -> 1x1 conv -> gate the input) is ``ops.lka.lka``; the MLP's
depthwise conv is ``ops.DWConv2d``. The head averages the last stage's (normed) map and applies a linear layer.

Key layout vs the official code (``checkpoint_filter_fn`` converts): ``patch_embed{i}`` -> ``stages.{i-1}.downsample``,
``block{i}.{j}`` -> ``stages.{i-1}.blocks.{j}``, ``norm{i}`` -> ``stages.{i-1}.norm``, ``layer_scale_1/2`` ->
``ls1/ls2.gamma``, ``mlp.dwconv.dwconv`` -> ``mlp.dwconv``, ``head`` -> ``head.fc``; everything else
(``attn.proj_1``, ``attn.spatial_gating_unit.conv0/conv_spatial/conv1``, ``attn.proj_2``, ``norm1/2``, ``mlp.fc1/2``)
keeps its official name. Checkpoints of the Hugging Face transformers port (``VanForImageClassification``, hub ids
``Visual-Attention-Network/van-tiny`` .. ``van-large``) are converted too.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, LayerScale2d, get_device_dtype
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ops import DWConv2d
from ops.lka import lka

from ._common import build_model, check_input, check_state_dict, stage_intermediates, unwrap_checkpoint

__all__ = ["VAN"]


class LKA(nn.Module):
    """Large Kernel Attention: holds the official ``conv0``/``conv_spatial``/``conv1`` parameters, runs ``ops.lka``."""

    def __init__(self, dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.conv0 = DWConv2d(dim, 5, padding=2, **dd)
        self.conv_spatial = DWConv2d(dim, 7, padding=9, dilation=3, **dd)
        self.conv1 = nn.Conv2d(dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lka(x, self.conv0.weight, self.conv0.bias, self.conv_spatial.weight, self.conv_spatial.bias,
                   self.conv1.weight, self.conv1.bias)


class SpatialAttention(nn.Module):
    """``proj_2(LKA(GELU(proj_1(x)))) + x`` (official ``Attention``)."""

    def __init__(self, dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1, **dd)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LKA(dim, **dd)
        self.proj_2 = nn.Conv2d(dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class ConvMlp(nn.Module):
    """1x1 conv -> depthwise 3x3 conv -> GELU -> dropout -> 1x1 conv -> dropout (official ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1, **dd)
        self.dwconv = DWConv2d(hidden, 3, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class VANBlock(nn.Module):
    """``x += ls1 * attn(BN(x))``; ``x += ls2 * mlp(BN(x))``, drop-path on both branches."""

    def __init__(self, dim: int, mlp_ratio: float, proj_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-2, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.attn = SpatialAttention(dim, **dd)
        self.ls1 = LayerScale2d(dim, layer_scale_init_value, **dd)
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), proj_drop, **dd)
        self.ls2 = LayerScale2d(dim, layer_scale_init_value, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class OverlapPatchEmbed(nn.Module):
    """Strided conv with ``padding = kernel // 2`` followed by BatchNorm (official ``OverlapPatchEmbed``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, **dd)
        self.norm = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class VANStage(nn.Module):
    """Patch embedding -> blocks -> LayerNorm over channels (eps 1e-6)."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, kernel_size: int, stride: int, mlp_ratio: float,
                 proj_drop: float, drop_path: Sequence[float], device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = OverlapPatchEmbed(in_chs, out_chs, kernel_size, stride, **dd)
        self.blocks = nn.Sequential(*[VANBlock(out_chs, mlp_ratio, proj_drop, drop_path[d], **dd)
                                      for d in range(depth)])
        self.norm = LayerNorm2d(out_chs, eps=1e-6, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class VAN(nn.Module):
    """Visual Attention Network.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for no classifier).
        embed_dims: width of each stage.
        mlp_ratios: MLP expansion per stage.
        depths: blocks per stage.
        global_pool: head pooling ('avg' as the official code; '' keeps the map).
        drop_rate: dropout before the classifier (timm convention; the official code has none there).
        proj_drop_rate: dropout inside the MLPs (what the official code calls ``drop_rate``).
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        device, dtype: where and in which dtype the parameters are created (timm's factory keywords).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            depths: Sequence[int] = (3, 3, 12, 3),
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        num_stages = len(depths)
        if not len(embed_dims) == len(mlp_ratios) == num_stages:
            raise ValueError(f"embed_dims ({len(embed_dims)}), mlp_ratios ({len(mlp_ratios)}) and depths "
                             f"({num_stages}) must have one entry per stage")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]

        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        prev, reduction = in_chans, 1
        for i in range(num_stages):
            kernel_size, stride = (7, 4) if i == 0 else (3, 2)
            reduction *= stride
            stages.append(VANStage(prev, embed_dims[i], depths[i], kernel_size, stride, mlp_ratios[i],
                                   proj_drop_rate, dpr[i], **dd))
            prev = embed_dims[i]
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.stride = reduction
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the official init: conv weights N(0, 2 / fan_out), linear trunc-normal(0.02), zero biases
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- timm API ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stages\.0\.downsample",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))

    def _check_input(self, x: torch.Tensor) -> None:
        # every conv pads to keep at least one output pixel, so any H, W >= 1 works
        check_input(x, self.in_chans, name="VAN")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (each already through its stage's LayerNorm, so ``norm`` changes nothing) and the final map."""
        if output_fmt != "NCHW":
            raise ValueError("VAN's intermediates are NCHW only")
        self._check_input(x)
        return stage_intermediates(x, self.stages, indices, norm, stop_early, intermediates_only)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last wanted one (the norms belong to the stages: ``prune_norm`` is a no-op)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.stages(x)  # with grad checkpointing on, each stage checkpoints its blocks

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- checkpoint conversion -----------------------------------------------------------------------------------
_OFFICIAL_RULES = [
    (r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample."),
    (r"^block(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks."),
    (r"^norm(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
    (r"\.layer_scale_1$", ".ls1.gamma"),
    (r"\.layer_scale_2$", ".ls2.gamma"),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"^head\.", "head.fc."),
]

# Hugging Face transformers port (modeling_van.py), after stripping the optional 'van.' prefix
_HF_RULES = [
    (r"^encoder\.stages\.(\d+)\.embeddings\.convolution\.", r"stages.\1.downsample.proj."),
    (r"^encoder\.stages\.(\d+)\.embeddings\.normalization\.", r"stages.\1.downsample.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.", r"stages.\1.blocks."),
    (r"^encoder\.stages\.(\d+)\.normalization\.", r"stages.\1.norm."),
    (r"\.pre_normomalization\.", ".norm1."),  # sic: the port's spelling
    (r"\.post_normalization\.", ".norm2."),
    (r"\.attention\.pre_projection\.conv\.", ".attn.proj_1."),
    (r"\.attention\.attention_layer\.attention\.depth_wise\.", ".attn.spatial_gating_unit.conv0."),
    (r"\.attention\.attention_layer\.attention\.depth_wise_dilated\.", ".attn.spatial_gating_unit.conv_spatial."),
    (r"\.attention\.attention_layer\.attention\.point_wise\.", ".attn.spatial_gating_unit.conv1."),
    (r"\.attention\.post_projection\.", ".attn.proj_2."),
    (r"\.attention_scaling\.weight$", ".ls1.gamma"),
    (r"\.mlp_scaling\.weight$", ".ls2.gamma"),
    (r"\.mlp\.in_dense\.", ".mlp.fc1."),
    (r"\.mlp\.depth_wise\.", ".mlp.dwconv."),
    (r"\.mlp\.out_dense\.", ".mlp.fc2."),
    (r"^classifier\.", "head.fc."),
]


def _rename(sd: Mapping[str, Any], rules) -> Dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: VAN) -> Dict[str, torch.Tensor]:
    """Convert a VAN checkpoint as published to this layout (ours passes through).

    Accepts the official files (``{'state_dict': sd}`` from the timm-based ImageNet-1K training, ``{'model': sd}``
    from the ImageNet-22K code, bare ``sd``; 'module.' prefixes) and the transformers port's state_dicts. The
    official files hold nothing this model does not use; from the port, its unused final ``layernorm`` is dropped.
    """
    sd = unwrap_checkpoint(state_dict)
    if any(k.startswith(("encoder.stages.", "van.encoder.stages.")) for k in sd):  # transformers port
        # 'layernorm': VanModel creates a final LayerNorm that its forward never applies (pooling reads the stage map)
        sd = {k[len("van."):] if k.startswith("van.") else k: v for k, v in sd.items()}
        sd = _rename({k: v for k, v in sd.items() if not k.startswith("layernorm.")}, _HF_RULES)
    elif any(k.startswith("patch_embed1.") for k in sd):  # official
        sd = _rename(sd, _OFFICIAL_RULES)
    check_state_dict(sd, model)
    return sd


# ---- variants --------------------------------------------------------------------------------------------------
def _create_van(variant: str, pretrained: bool = False, **kwargs) -> VAN:
    return build_model(
        VAN, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    # ImageNet-1K checkpoints: the official van_b* set timm 0.4.12's vision_transformer._cfg() as default_cfg, and
    # the authors evaluate with timm's validate.py, which takes it: 224, resize 248 (crop_pct 0.9) + center crop,
    # bicubic, mean = std = 0.5 (so do mmpretrain's configs for the same files).
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_INCEPTION_MEAN, "std": IMAGENET_INCEPTION_STD,
        "first_conv": "stages.0.downsample.proj", "classifier": "head.fc",
        "license": "apache-2.0", "paper_ids": "arXiv:2202.09741", "paper_name": "Visual Attention Network",
        "origin_url": "https://github.com/Visual-Attention-Network/VAN-Classification",
        **kwargs,
    }


def _hf(repo: str, file: str) -> str:
    return f"https://huggingface.co/Visual-Attention-Network/{repo}/resolve/main/{file}"


# B4 (ImageNet-1K) and the ImageNet-22K pre-trained B4-B6 are in the authors' Tsinghua Cloud folder linked from
# VAN-Segmentation's README (file names as its configs load them).
_TSINGHUA = "https://cloud.tsinghua.edu.cn/d/0100f0cea37d41ba8d08/files/?p=%2F{}&dl=1"
# ImageNet-22K pre-training (LGYoung/VAN-Classification, ImageNet-22k/main.py, a ConvNeXt-style script): 21841
# classes, ImageNet mean/std (imagenet_default_mean_and_std=True), its eval transform at 224: resize 256 bicubic +
# center crop 224 (crop_pct 224/256). The authors did not evaluate these on a benchmark (--disable_eval).
_IN22K = dict(num_classes=21841, crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

default_cfgs = generate_default_cfgs({
    # official top-1 (ImageNet-1K val, 224) in the comments
    "van_b0.in1k": _cfg(_hf("VAN-Tiny-original", "van_tiny_754.pth.tar")),  # 75.4
    "van_b1.in1k": _cfg(_hf("VAN-Small-original", "van_small_811.pth.tar")),  # 81.1
    "van_b2.in1k": _cfg(_hf("VAN-Base-original", "van_base_828.pth.tar")),  # 82.8
    "van_b3.in1k": _cfg(_hf("VAN-Large-original", "van_large_839.pth.tar")),  # 83.9
    "van_b4.in1k": _cfg(_TSINGHUA.format("van_b4.pth")),  # 84.2 (paper); 84.13 re-measured by mmpretrain
    "van_b4.in22k": _cfg(_TSINGHUA.format("van_b4_22k.pth"), **_IN22K),  # pre-training only, no top-1
    "van_b5.in22k": _cfg(_TSINGHUA.format("van_b5_22k.pth"), **_IN22K),  # pre-training only, no top-1
    "van_b6.in22k": _cfg(_TSINGHUA.format("van_b6_22k.pth"), **_IN22K),  # pre-training only, no top-1
})


@register_model
def van_b0(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B0 (VAN-Tiny), 4.1M params."""
    args = dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b0", pretrained, **dict(args, **kwargs))


@register_model
def van_b1(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B1 (VAN-Small), 13.9M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b1", pretrained, **dict(args, **kwargs))


@register_model
def van_b2(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B2 (VAN-Base), 26.6M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b2", pretrained, **dict(args, **kwargs))


@register_model
def van_b3(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B3 (VAN-Large), 44.8M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b3", pretrained, **dict(args, **kwargs))


@register_model
def van_b4(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B4, 60.3M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b4", pretrained, **dict(args, **kwargs))


@register_model
def van_b5(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B5, 90.0M params (1000 classes)."""
    args = dict(embed_dims=(96, 192, 480, 768), depths=(3, 3, 24, 3), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b5", pretrained, **dict(args, **kwargs))


@register_model
def van_b6(pretrained: bool = False, **kwargs) -> VAN:
    """VAN-B6, 199.8M params (1000 classes)."""
    args = dict(embed_dims=(96, 192, 384, 768), depths=(6, 6, 90, 6), mlp_ratios=(8, 8, 4, 4))
    return _create_van("van_b6", pretrained, **dict(args, **kwargs))
