"""HaloNet for timm: ResNet-style backbones whose spatial mixer is blocked local self-attention with halos.

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (Vaswani, Ramachandran, Srinivas,
Parmar, Hechtman, Shlens; CVPR 2021), https://arxiv.org/abs/2103.12731. Google released no code or weights; the
reference implementation, and the only trained HaloNet weights, are timm's (``byoanet.py`` + ``byobnet.py`` +
``layers/halo_attn.py``, Apache-2.0). This file is a standalone re-implementation that reproduces timm's numerics
and loads its checkpoints; the attention itself is ``ops.halo_attention`` (a Triton kernel will replace it).

Blocks (one residual each, BatchNorm everywhere):
  * halo block ('h'): 1x1 conv -> halo attention (carries the stride) -> BN+act -> 1x1 conv -> + shortcut -> act.
    Stride 2 uses strided queries (each ``b/2 x b/2`` query tile attends its block's haloed window) when the block
    size is even, else full-resolution attention followed by 2x2 average pooling (timm's rule).
  * bottleneck block ('c'): 1x1 conv -> 3x3 (grouped) conv with the stride -> SE/ECA -> 1x1 conv -> + shortcut -> act.
  Shortcut: identity, or a strided 1x1 conv+BN when the shape changes (``proj_shortcut=False``: no residual then).

Hub names (timm already registers the official ones, so the hub uses a ``halo_`` prefix):
  ``halo_h0`` .. ``halo_h7``       the paper's pure-attention HaloNet-H0..H7 (no weights were released)
  ``halo_resnet26t``              = timm ``halonet26t``        (weights ``a1h_in1k``)
  ``halo_seresnet33ts``           = timm ``sehalonet33ts``     (weights ``ra2_in1k``)
  ``halo_resnet50ts``             = timm ``halonet50ts``       (weights ``a1h_in1k``)
  ``halo_ecaresnext26ts``         = timm ``eca_halonext26ts``  (weights ``c1_in1k``)
  ``halo_regnetz_b``              = timm ``haloregnetz_b``     (weights ``ra3_in1k``)

HaloNet-H0..H7 as the paper specifies them (its model-family table: block size b, halo h, value multiplier r_v,
bottleneck output multiplier r_b, third-stage depth l_3, final 1x1 conv width d_f, train/test size s), with these
readings of the text, all stated here because the paper gives no code:
  * ResNet-50 layout: 7x7/2 conv stem (64 ch) + 3x3/2 max-pool, stages of (3, 3, l_3, 3) halo blocks at strides
    (1, 2, 2, 2) with base widths w = (64, 128, 256, 512); ReLU; 8 heads in every attention layer.
  * a block's output (residual) width is ``r_b * w``; its attention input and query/key width is ``w``
    (head dim w/8) and its value width ``r_v * w``. These reproduce the paper's parameter counts for all eight
    models (5.5, 8.1, 9.4, 11.8, 19.1, 30.7, 43.5 (paper: 43.4), 67.4 M) and timm's ``halonet_h1`` exactly.
  * relative position logits, zero-padded halos, strided queries as in timm (which the fixtures pin down).
  * H7's paper size 600 is not a multiple of 32*b = 320, which the block rule (every attention map divisible by
    b, no padding) needs; its cfg uses 640. Models take inputs whose sides are multiples of ``model.input_multiple``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (BatchNormAct2d, ClassifierHead, ConvNormAct, DropPath, calculate_drop_path_rates,
                         get_act_layer, get_attn, get_device_dtype, make_divisible, trunc_normal_)
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ops.halo_attention import halo_attention

from ._common import build_model, check_input, check_state_dict, ofq_attention, stage_intermediates, unwrap_checkpoint

__all__ = ["HaloNet", "StageCfg"]


@dataclass(frozen=True)
class StageCfg:
    """One stage. ``blocks`` has one letter per block: 'c' bottleneck conv block, 'h' halo-attention block."""
    blocks: str
    out_chs: int
    stride: int = 2  # of the stage's first block
    bottle_ratio: float = 0.25  # block mid width = make_divisible(out (or in, with bottle_in) * bottle_ratio)
    group_size: int = 0  # channels per group of the 3x3 conv in 'c' blocks (0: dense)
    attn_layer: Optional[str] = None  # overrides the model's channel attention ('se', 'eca') of 'c' blocks
    halo: Optional[Dict[str, Any]] = None  # replaces (not merges) the model's halo-attention kwargs


@ofq_attention("halo")
class HaloAttention(nn.Module):
    """Query and key/value 1x1 convs and relative position tables around :func:`ops.halo_attention`.

    ``kv`` output channels are per head ``[k (dim_head_qk), v (dim_head_v)]``, heads-major (timm's layout).
    """

    def __init__(self, dim: int, num_heads: int, dim_head_qk: int, dim_head_v: int, block_size: int,
                 halo_size: int, stride: int = 1, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"halo attention supports stride 1 or 2, got {stride}")
        self.num_heads, self.dim_head_qk, self.dim_head_v = num_heads, dim_head_qk, dim_head_v
        self.block_size, self.halo_size = block_size, halo_size
        use_pool = block_size % stride != 0  # odd block with stride 2: attend at full res, then 2x2 average pool
        self.q_stride = 1 if use_pool else stride
        self.q = nn.Conv2d(dim, num_heads * dim_head_qk, 1, stride=self.q_stride, bias=False, **dd)
        self.kv = nn.Conv2d(dim, num_heads * (dim_head_qk + dim_head_v), 1, bias=False, **dd)
        win = block_size + 2 * halo_size
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * win - 1, dim_head_qk, **dd))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * win - 1, dim_head_qk, **dd))
        self.pool = nn.AvgPool2d(2) if use_pool else nn.Identity()

    def reset_parameters(self) -> None:
        std = self.q.in_channels ** -0.5
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        trunc_normal_(self.rel_pos_h, std=self.dim_head_qk ** -0.5)
        trunc_normal_(self.rel_pos_w, std=self.dim_head_qk ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(1, (self.num_heads, self.dim_head_qk))
        k, v = self.kv(x).unflatten(1, (self.num_heads, -1)).split([self.dim_head_qk, self.dim_head_v], dim=2)
        x = halo_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, self.block_size, self.halo_size, self.q_stride)
        return self.pool(x)


def _shortcut(in_chs: int, out_chs: int, stride: int, proj: bool, **dd) -> Optional[nn.Module]:
    if in_chs == out_chs and stride == 1:
        return nn.Identity()
    return ConvNormAct(in_chs, out_chs, 1, stride=stride, apply_act=False, **dd) if proj else None


class _ResidualBlock(nn.Module):
    """Shared tail: ``conv3_1x1`` (no act) -> drop path -> + shortcut (if any) -> act."""

    def _init_tail(self, in_chs, out_chs, stride, mid_chs, act_layer, proj_shortcut, linear_out, drop_path, **dd):
        self.shortcut = _shortcut(in_chs, out_chs, stride, proj_shortcut, **dd)
        self.conv3_1x1 = ConvNormAct(mid_chs, out_chs, 1, apply_act=False, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = nn.Identity() if linear_out else act_layer(inplace=True)

    def init_weights(self, zero_init_last: bool) -> None:
        if zero_init_last and self.shortcut is not None:
            nn.init.zeros_(self.conv3_1x1.bn.weight)

    def _residual(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        x = self.drop_path(self.conv3_1x1(x))
        if self.shortcut is not None:
            x = x + self.shortcut(shortcut)
        return self.act(x)


class BottleneckBlock(_ResidualBlock):
    """1x1 conv -> 3x3 (grouped) conv carrying the stride -> channel attention -> 1x1 conv -> + shortcut -> act."""

    def __init__(self, in_chs: int, out_chs: int, mid_chs: int, stride: int, act_layer: type, proj_shortcut: bool,
                 linear_out: bool, drop_path: float, group_size: int = 0,
                 attn_layer: Optional[Callable[..., nn.Module]] = None, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        groups = mid_chs // group_size if group_size else 1
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1, act_layer=act_layer, **dd)
        self.conv2_kxk = ConvNormAct(mid_chs, mid_chs, 3, stride=stride, groups=groups, act_layer=act_layer, **dd)
        self.attn = attn_layer(mid_chs, **dd) if attn_layer is not None else nn.Identity()
        self._init_tail(in_chs, out_chs, stride, mid_chs, act_layer, proj_shortcut, linear_out, drop_path, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual(self.attn(self.conv2_kxk(self.conv1_1x1(x))), x)


class HaloBlock(_ResidualBlock):
    """1x1 conv -> halo attention carrying the stride -> BN + act -> 1x1 conv -> + shortcut -> act.

    Attention widths: query/key ``dim_head`` per head (default ``make_divisible(mid_chs * qk_ratio) // num_heads``),
    value ``mid_chs * value_ratio / num_heads`` per head.
    """

    def __init__(self, in_chs: int, out_chs: int, mid_chs: int, stride: int, act_layer: type, proj_shortcut: bool,
                 linear_out: bool, drop_path: float, block_size: int, halo_size: int, num_heads: int = 8,
                 dim_head: Optional[int] = None, qk_ratio: float = 1.0, value_ratio: float = 1.0, device=None,
                 dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        dim_v = round(mid_chs * value_ratio)
        if dim_v % num_heads:
            raise ValueError(f"value width {dim_v} is not divisible by num_heads={num_heads}")
        dim_head_qk = dim_head or make_divisible(mid_chs * qk_ratio, divisor=8) // num_heads
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1, act_layer=act_layer, **dd)
        self.self_attn = HaloAttention(mid_chs, num_heads, dim_head_qk, dim_v // num_heads, block_size, halo_size,
                                       stride, **dd)
        self.post_attn = BatchNormAct2d(dim_v, act_layer=act_layer, **dd)
        self._init_tail(in_chs, out_chs, stride, dim_v, act_layer, proj_shortcut, linear_out, drop_path, **dd)

    def init_weights(self, zero_init_last: bool) -> None:
        super().init_weights(zero_init_last)
        self.self_attn.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual(self.post_attn(self.self_attn(self.conv1_1x1(x))), x)


class Stem(nn.Sequential):
    """'7x7': one 7x7/2 conv; '3x3': one 3x3/2 conv; 'tiered': 3x3 convs to (3/8, 1/2, 1) x out_chs, the first
    stride 2 and the last stride 2 when there is no pool. ``pool``: a 3x3/2 max-pool after the convs."""

    def __init__(self, in_chs: int, out_chs: int, stem_type: str, pool: bool, act_layer: type, device=None,
                 dtype=None):
        super().__init__()
        if stem_type == "7x7":
            convs = [(out_chs, 7, 2)]
        elif stem_type == "3x3":
            convs = [(out_chs, 3, 2)]
        elif stem_type == "tiered":
            convs = [(3 * out_chs // 8, 3, 2), (out_chs // 2, 3, 1), (out_chs, 3, 1 if pool else 2)]
        else:
            raise ValueError(f"stem_type must be '7x7', '3x3' or 'tiered', got {stem_type!r}")
        self.stride = 1
        for i, (chs, k, s) in enumerate(convs):
            self.add_module(f"conv{i + 1}", ConvNormAct(in_chs, chs, k, stride=s, act_layer=act_layer,
                                                        device=device, dtype=dtype))
            in_chs, self.stride = chs, self.stride * s
        if pool:
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
            self.stride *= 2


class HaloNet(nn.Module):
    """Stem, stages of bottleneck ('c') and halo-attention ('h') blocks, optional 1x1 conv, pooled linear head.

    Args:
        stages: the stages (see :class:`StageCfg`).
        halo: halo-attention kwargs of 'h' blocks: ``block_size``, ``halo_size``, ``num_heads`` (8), ``dim_head``
            (query/key dim per head), ``qk_ratio`` (1.0), ``value_ratio`` (1.0); a stage's ``halo`` replaces it.
        stem_type / stem_chs / stem_pool: see :class:`Stem`.
        num_features: width of the final 1x1 conv+BN+act (0: none).
        act_layer: activation name.
        attn_layer / attn_kwargs: channel attention of 'c' blocks (timm name, e.g. 'se', 'eca'; None: none).
        proj_shortcut: 1x1 conv shortcut where a block changes shape (False: no residual in those blocks).
        bottle_in: mid width from the block's input width (RegNet style) instead of its output width.
        linear_out: no activation after the residual sum.
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as in timm.
        zero_init_last: zero the last BN of residual branches at init.
        device, dtype: where and in which dtype the parameters are created (timm's factory keywords).
    """

    def __init__(
            self,
            stages: Sequence[StageCfg],
            halo: Dict[str, Any],
            stem_type: str = "tiered",
            stem_chs: int = 64,
            stem_pool: bool = True,
            num_features: int = 0,
            act_layer: str = "relu",
            attn_layer: Optional[str] = None,
            attn_kwargs: Optional[Dict[str, Any]] = None,
            proj_shortcut: bool = True,
            bottle_in: bool = False,
            linear_out: bool = False,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        act = get_act_layer(act_layer)

        self.stem = Stem(in_chans, stem_chs, stem_type, stem_pool, act, **dd)
        prev, reduction = stem_chs, self.stem.stride
        self.input_multiple = reduction  # every halo layer's input map must be divisible by its block size
        dpr = calculate_drop_path_rates(drop_path_rate, [len(s.blocks) for s in stages], stagewise=True)
        stage_modules, self.feature_info = [], []
        for i, s in enumerate(stages):
            stage_attn = s.attn_layer or attn_layer
            blocks = []
            for j, kind in enumerate(s.blocks):
                stride = s.stride if j == 0 else 1
                mid_chs = make_divisible((prev if bottle_in else s.out_chs) * s.bottle_ratio)
                common = dict(in_chs=prev, out_chs=s.out_chs, mid_chs=mid_chs, stride=stride, act_layer=act,
                              proj_shortcut=proj_shortcut, linear_out=linear_out, drop_path=dpr[i][j], **dd)
                if kind == "h":
                    blocks.append(HaloBlock(**common, **(s.halo if s.halo is not None else halo)))
                    block_size = blocks[-1].self_attn.block_size
                    self.input_multiple = math.lcm(self.input_multiple, reduction * block_size)
                elif kind == "c":
                    attn_fn = partial(get_attn(stage_attn), **(attn_kwargs or {})) if stage_attn else None
                    blocks.append(BottleneckBlock(**common, group_size=s.group_size, attn_layer=attn_fn))
                else:
                    raise ValueError(f"block kinds are 'c' (bottleneck) or 'h' (halo), got {kind!r} in {s.blocks!r}")
                reduction *= stride
                prev = s.out_chs
            stage_modules.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stage_modules)

        self.num_features = self.head_hidden_size = num_features or prev
        self.final_conv = ConvNormAct(prev, num_features, 1, act_layer=act, **dd) if num_features else nn.Identity()
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self._init_weights(zero_init_last)

    @torch.no_grad()
    def _init_weights(self, zero_init_last: bool) -> None:
        # timm ByobNet's init: fan-out normal convs, small-normal classifier, then the blocks' own resets
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, _ResidualBlock):
                m.init_weights(zero_init_last)

    # ---- timm API ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=[(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None), (r"^final_conv", (99999,))],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # relative position tables, as other rel-pos models do (timm's own HaloNet recipes did decay them)
        return {n for n, _ in self.named_parameters() if n.endswith((".rel_pos_h", ".rel_pos_w"))}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_chans, multiple=self.input_multiple,
                    name="HaloNet (each halo-attention map must be a multiple of its block size)")

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (``norm=True`` applies the final 1x1 conv to the last one) and the final features."""
        if output_fmt != "NCHW":
            raise ValueError("HaloNet's intermediates are NCHW only")
        self._check_input(x)
        x = self.stem(x)
        return stage_intermediates(x, self.stages, indices, norm, stop_early, intermediates_only,
                                   final_norm=self.final_conv, run=self._run_stage)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.final_conv = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)
        x = self._run_stage(self.stages, x)
        return self.final_conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- checkpoint conversion -----------------------------------------------------------------------------------
_TIMM_RULES = [
    (r"\.self_attn\.pos_embed\.height_rel$", ".self_attn.rel_pos_h"),
    (r"\.self_attn\.pos_embed\.width_rel$", ".self_attn.rel_pos_w"),
    (r"^stem\.(conv|bn)\.", r"stem.conv1.\1."),  # timm's single-conv stem (haloregnetz_b) is a bare ConvNormAct
]


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: HaloNet) -> Dict[str, torch.Tensor]:
    """Convert a timm ByobNet HaloNet checkpoint (as published: flat, or nested / EMA / 'module.'-prefixed).

    Only two things are renamed (the rel-pos tables, the single-conv stem); every other timm key is ours already,
    and timm stores nothing that this model does not use. Hub-format state dicts pass through unchanged.
    """
    sd = unwrap_checkpoint(state_dict)
    out = {}
    for k, v in sd.items():
        for pattern, repl in _TIMM_RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    check_state_dict(out, model)
    return out


# ---- variants --------------------------------------------------------------------------------------------------
def _create_halonet(variant: str, pretrained: bool = False, **kwargs) -> HaloNet:
    return build_model(
        HaloNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(hf_hub_id: str = "", url: str = "", **kwargs) -> Dict[str, Any]:
    # timm's default_cfgs for these weights (its validate.py evaluated them with exactly these: results-imagenet.csv)
    return {
        "hf_hub_id": hf_hub_id, "url": url,
        "num_classes": 1000, "input_size": (3, 256, 256), "pool_size": (8, 8), "min_input_size": (3, 256, 256),
        "crop_pct": 0.94, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv", "classifier": "head.fc",
        "license": "apache-2.0", "paper_ids": "arXiv:2103.12731",
        "paper_name": "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
        "origin_url": "https://github.com/huggingface/pytorch-image-models",
        **kwargs,
    }


def _size(s: int, multiple: int) -> Dict[str, Any]:
    return dict(input_size=(3, s, s), pool_size=(s // 32, s // 32), min_input_size=(3, multiple, multiple))


_TIMM_RELEASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-attn-weights/"
default_cfgs = generate_default_cfgs({
    # The paper's H-series: no weights were released; the comments give the paper's ImageNet top-1 (at size s).
    # The paper does not state its eval crop; crop_pct/interpolation are timm's byoanet defaults.
    "halo_h0.untrained": _cfg(crop_pct=0.95, **_size(256, 256)),  # 77.9
    "halo_h1.untrained": _cfg(crop_pct=0.95, **_size(256, 256)),  # 79.9
    "halo_h2.untrained": _cfg(crop_pct=0.95, **_size(256, 256)),  # 80.4
    "halo_h3.untrained": _cfg(crop_pct=0.95, **_size(320, 320)),  # 81.9
    "halo_h4.untrained": _cfg(crop_pct=0.95, **_size(384, 384)),  # 83.3
    "halo_h5.untrained": _cfg(crop_pct=0.95, **_size(448, 448)),  # 84.0
    "halo_h6.untrained": _cfg(crop_pct=0.95, **_size(512, 512)),  # 84.4
    "halo_h7.untrained": _cfg(crop_pct=0.95, **_size(640, 320)),  # 84.9 (paper at 600, see the module docstring)
    # timm's trained hybrids (Ross Wightman); official top-1 from timm's results-imagenet.csv
    "halo_resnet26t.a1h_in1k": _cfg(
        "timm/halonet26t.a1h_in1k", _TIMM_RELEASE + "halonet26t_a1h_256-3083328c.pth", crop_pct=0.95),  # 79.134
    "halo_seresnet33ts.ra2_in1k": _cfg(
        "timm/sehalonet33ts.ra2_in1k", _TIMM_RELEASE + "sehalonet33ts_256-87e053f9.pth"),  # 80.976
    "halo_resnet50ts.a1h_in1k": _cfg(
        "timm/halonet50ts.a1h_in1k", _TIMM_RELEASE + "halonet50ts_a1h2_256-f3a3daee.pth"),  # 81.640
    "halo_ecaresnext26ts.c1_in1k": _cfg(
        "timm/eca_halonext26ts.c1_in1k", _TIMM_RELEASE + "eca_halonext26ts_c_256-06906299.pth"),  # 79.518
    "halo_regnetz_b.ra3_in1k": _cfg(
        "timm/haloregnetz_b.ra3_in1k", _TIMM_RELEASE + "haloregnetz_c_raa_256-c8ad7616.pth",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **_size(224, 224)),  # 81.058
})


def _h_series(variant: str, pretrained: bool, b: int, h: int, rv: float, rb: float, l3: int, df: int, **kwargs):
    """HaloNet-H*: the paper's (b, h, r_v, r_b, l_3, d_f); widths as read in the module docstring."""
    stages = tuple(
        StageCfg("h" * d, int(w * rb), stride, bottle_ratio=1 / rb)
        for d, w, stride in zip((3, 3, l3, 3), (64, 128, 256, 512), (1, 2, 2, 2)))
    args = dict(stages=stages, halo=dict(block_size=b, halo_size=h, num_heads=8, value_ratio=rv),
                stem_type="7x7", stem_chs=64, stem_pool=True, num_features=df, act_layer="relu")
    return _create_halonet(variant, pretrained, **dict(args, **kwargs))


@register_model
def halo_h0(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H0 (5.50M params)."""
    return _h_series("halo_h0", pretrained, b=8, h=3, rv=1.0, rb=0.5, l3=7, df=0, **kwargs)


@register_model
def halo_h1(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H1 (8.10M params), = timm ``halonet_h1``."""
    return _h_series("halo_h1", pretrained, b=8, h=3, rv=1.0, rb=1.0, l3=10, df=0, **kwargs)


@register_model
def halo_h2(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H2 (9.40M params)."""
    return _h_series("halo_h2", pretrained, b=8, h=3, rv=1.0, rb=1.25, l3=11, df=0, **kwargs)


@register_model
def halo_h3(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H3 (11.84M params)."""
    return _h_series("halo_h3", pretrained, b=10, h=3, rv=1.0, rb=1.5, l3=12, df=1024, **kwargs)


@register_model
def halo_h4(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H4 (19.10M params)."""
    return _h_series("halo_h4", pretrained, b=12, h=2, rv=1.0, rb=3.0, l3=12, df=1280, **kwargs)


@register_model
def halo_h5(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H5 (30.72M params)."""
    return _h_series("halo_h5", pretrained, b=14, h=2, rv=2.5, rb=2.0, l3=23, df=1536, **kwargs)


@register_model
def halo_h6(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H6 (43.46M params)."""
    return _h_series("halo_h6", pretrained, b=8, h=4, rv=3.0, rb=2.75, l3=24, df=1536, **kwargs)


@register_model
def halo_h7(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H7 (67.43M params)."""
    return _h_series("halo_h7", pretrained, b=10, h=3, rv=4.0, rb=3.5, l3=26, df=2048, **kwargs)


@register_model
def halo_resnet26t(pretrained: bool = False, **kwargs) -> HaloNet:
    """timm ``halonet26t``: ResNet-26-T, halo attention in the last two stages (12.48M params)."""
    args = dict(
        stages=(StageCfg("cc", 256, 1), StageCfg("cc", 512), StageCfg("ch", 1024), StageCfg("hh", 2048)),
        halo=dict(block_size=8, halo_size=2), stem_type="tiered", act_layer="relu")
    return _create_halonet("halo_resnet26t", pretrained, **dict(args, **kwargs))


@register_model
def halo_seresnet33ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """timm ``sehalonet33ts``: ResNet-33-TS with SE, halo attention in the last three stages (13.69M params)."""
    args = dict(
        stages=(StageCfg("cc", 256, 1), StageCfg("cch", 512), StageCfg("cch", 1024),
                StageCfg("hh", 1536, bottle_ratio=0.333)),
        halo=dict(block_size=8, halo_size=3), stem_type="tiered", stem_pool=False, num_features=1280,
        act_layer="silu", attn_layer="se")
    return _create_halonet("halo_seresnet33ts", pretrained, **dict(args, **kwargs))


@register_model
def halo_resnet50ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """timm ``halonet50ts``: ResNet-50-TS, halo attention interleaved in the last three stages (22.73M params)."""
    args = dict(
        stages=(StageCfg("ccc", 256, 1), StageCfg("ccch", 512, halo=dict(block_size=8, halo_size=3, num_heads=4)),
                StageCfg("chchch", 1024), StageCfg("chc", 2048)),
        halo=dict(block_size=8, halo_size=3), stem_type="tiered", act_layer="silu")
    return _create_halonet("halo_resnet50ts", pretrained, **dict(args, **kwargs))


@register_model
def halo_ecaresnext26ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """timm ``eca_halonext26ts``: ResNeXt-26-TS (group size 16) with ECA, halo attention in the last two stages
    (10.76M params)."""
    args = dict(
        stages=(StageCfg("cc", 256, 1, group_size=16), StageCfg("cc", 512, group_size=16),
                StageCfg("ch", 1024, group_size=16), StageCfg("hh", 2048, group_size=16)),
        halo=dict(block_size=8, halo_size=2, dim_head=16), stem_type="tiered", act_layer="silu", attn_layer="eca")
    return _create_halonet("halo_ecaresnext26ts", pretrained, **dict(args, **kwargs))


@register_model
def halo_regnetz_b(pretrained: bool = False, **kwargs) -> HaloNet:
    """timm ``haloregnetz_b``: RegNetZ-B style (SE, group size 16, no projection shortcuts) with halo attention,
    block 7 (odd: stride 2 by average pooling), in the last two stages (11.68M params)."""
    args = dict(
        stages=(StageCfg("cc", 48, bottle_ratio=3, group_size=16), StageCfg("c" * 6, 96, bottle_ratio=3, group_size=16),
                StageCfg("ccch" * 3, 192, bottle_ratio=3, group_size=16),
                StageCfg("hh", 288, bottle_ratio=3, group_size=16)),
        halo=dict(block_size=7, halo_size=2, qk_ratio=0.33), stem_type="3x3", stem_chs=32, stem_pool=False,
        num_features=1536, act_layer="silu", attn_layer="se", attn_kwargs=dict(rd_ratio=0.25), proj_shortcut=False,
        bottle_in=True, linear_out=True)
    return _create_halonet("halo_regnetz_b", pretrained, **dict(args, **kwargs))
