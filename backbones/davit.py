"""DaViT (Dual Attention Vision Transformers) for timm.

Paper: "DaViT: Dual Attention Vision Transformers" (Ding, Xiao, Codella, Luo, Wang, Yuan; ECCV 2022),
https://arxiv.org/abs/2204.03645. Official code: https://github.com/dingmyu/davit (timm/models/davit.py), MIT.
Florence-2 variants (``*_fl``): "Florence-2: Advancing a Unified Representation for a Variety of Vision Tasks",
https://arxiv.org/abs/2311.06242 (the image encoder of microsoft/Florence-2-base/-large, MIT).

A 4-stage pyramid. Every block pairs a spatial block (window self-attention) with a channel block (channel-group
attention whose ``d x d`` map spans the whole image); each of the two is
``cpe1 -> x + attn(norm1(x)) -> cpe2 -> x + mlp(norm2(x))`` with ``cpe`` a residual depthwise 3x3 conv (positional
encoding). The token mixers go through ``ops.window_attention`` / ``ops.channel_attention``, the depthwise convs
through ``ops.DWConv2d``. Any input size works: the stem pads to a multiple of 4, each downsample to an even size,
each window attention to a multiple of the window (zero tokens AFTER norm1, unmasked, as the official code).

Hub names ``davit_t/_s/_b/_l/_h/_g`` and ``davit_b_fl/_h_fl`` (timm owns ``davit_tiny`` etc. for its own class).
Our key layout is timm's (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j.{0,1}`` or
``.{spatial,channel}_block`` for ``named_blocks``, ``cpe1/cpe2``, ``head.norm/head.fc``), so timm's hub checkpoints
load as they are; ``checkpoint_filter_fn`` also converts the official repo's and Florence-2's layouts.

Differences from timm's DaVit: ``ffn=False`` works (timm's crashes), drop-path rates follow the official schedule
(one rate per spatial/channel sub-block, linearly increasing), ``davit_l`` is the official
``DaViT_large_window12_384`` (window 12, 384 input).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (ClassifierHead, DropPath, LayerNorm2d, Mlp, NormMlpClassifierHead, get_device_dtype,
                         trunc_normal_)
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from backbones._common import (build_model, check_input, check_state_dict, ofq_attention, stage_intermediates,
                               unwrap_checkpoint)
from ops.channel_attention import channel_attention, channel_attention_reference
from ops.dwconv import DWConv2d
from ops.window_attention import window_attention

__all__ = ["DaVit"]


class ConvPosEnc(nn.Module):
    """Conditional positional encoding: ``x + act(dwconv3x3(x))`` on NCHW maps (act: Identity, or GELU if cpe_act)."""

    def __init__(self, dim: int, act: bool = False, device=None, dtype=None):
        super().__init__()
        self.proj = DWConv2d(dim, 3, device=device, dtype=dtype)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.proj(x))


class Stem(nn.Module):
    """Zero-pad right/bottom to a multiple of 4, conv 7x7 stride 4 (padding 3), LayerNorm over channels."""

    def __init__(self, in_chs: int, out_chs: int, norm_eps: float, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 7, stride=4, padding=3, **dd)
        self.norm = LayerNorm2d(out_chs, eps=norm_eps, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, -x.shape[-1] % 4, 0, -x.shape[-2] % 4))
        return self.norm(self.conv(x))


class Downsample(nn.Module):
    """LayerNorm over channels, zero-pad right/bottom to even H/W, conv stride 2: kernel 2 (padding 0) or kernel 3
    (padding 1, the official ``overlapped_patch``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, norm_eps: float, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if kernel_size not in (2, 3):
            raise ValueError(f"down_kernel_size must be 2 or 3, got {kernel_size}")
        self.norm = LayerNorm2d(in_chs, eps=norm_eps, **dd)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=2, padding=(kernel_size - 1) // 2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.conv(x)


@ofq_attention("davit_window")
class WindowAttention(nn.Module):
    """Window self-attention on a channels-last map ``(B, H, W, C)``: zero-pad to a multiple of the window (the
    padded tokens get the qkv bias and are attended to, unmasked, as in the official code), attend, crop, project."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        ws = self.window_size
        x = F.pad(x, (0, 0, 0, -W % ws, 0, -H % ws))
        x = window_attention(self.qkv(x), self.num_heads, ws)
        return self.proj(x[:, :H, :W])


@ofq_attention("davit_channel")
class ChannelAttention(nn.Module):
    """Channel-group attention over all tokens of a channels-last map ``(B, H, W, C)`` (``version`` 1: DaViT,
    2: Florence-2; see ``ops.channel_attention`` for the exact roles and scales). ``probs_quant`` (set by OFQ)
    quantizes the ``d x d`` attention weights; the fused op has no hook for them, so the reference runs then."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, version: int = 1, device=None,
                 dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_heads = num_heads
        self.version = version
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.probs_quant = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x.reshape(B, H * W, C))
        if self.probs_quant is None:
            x = channel_attention(qkv, self.num_heads, self.version)
        else:
            x = channel_attention_reference(qkv, self.num_heads, self.version, probs_fn=self.probs_quant)
        return self.proj(x).reshape(B, H, W, C)


class DaVitBlock(nn.Module):
    """One spatial or channel block on NCHW maps:
    ``x = cpe1(x); x = x + drop_path(attn(norm1(x))); x = cpe2(x); x = x + drop_path(mlp(norm2(x)))`` (the last step
    only when ``ffn``). Norms and the attention work on channels-last tokens."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float, ffn: bool, cpe_act: bool,
                 norm_eps: float, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.cpe1 = ConvPosEnc(dim, cpe_act, **dd)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = attn
        self.cpe2 = ConvPosEnc(dim, cpe_act, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd) if ffn else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd) if ffn else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = self.cpe2(x.permute(0, 3, 1, 2))
        if self.mlp is not None:
            x = x.permute(0, 2, 3, 1)
            x = x + self.drop_path(self.mlp(self.norm2(x)))
            x = x.permute(0, 3, 1, 2)
        return x


class DaVitStage(nn.Module):
    """Optional downsample, then ``depth`` dual blocks, each a Sequential of one block per ``attn_types`` entry."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, attn_types: Sequence[str],
                 num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool, drop_path: Sequence[float],
                 ffn: bool, cpe_act: bool, down_kernel_size: int, channel_attn_version: int, named_blocks: bool,
                 norm_eps: float, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, out_chs, down_kernel_size, norm_eps, **dd) if downsample else nn.Identity()
        blocks, dp = [], iter(drop_path)
        for _ in range(depth):
            dual = OrderedDict()
            for i, kind in enumerate(attn_types):
                if kind == "spatial":
                    attn = WindowAttention(out_chs, num_heads, window_size, qkv_bias, **dd)
                else:
                    attn = ChannelAttention(out_chs, num_heads, qkv_bias, channel_attn_version, **dd)
                dual[f"{kind}_block" if named_blocks else str(i)] = DaVitBlock(
                    out_chs, attn, mlp_ratio, next(dp), ffn, cpe_act, norm_eps, **dd)
            blocks.append(nn.Sequential(dual))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class DaVit(nn.Module):
    """DaViT: stem, four stages of dual (spatial window + channel group) attention blocks, pooled classifier head.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for no classifier).
        depths: dual blocks per stage.
        embed_dims: width of each stage.
        num_heads: attention heads per stage (both attentions).
        window_size: spatial attention window (square).
        mlp_ratio: MLP hidden width / width.
        qkv_bias: bias in the qkv projections.
        attn_types: order of the blocks inside a dual block ('spatial', 'channel').
        ffn: MLP after each attention (False: the official attention-only ablation).
        cpe_act: GELU inside the positional-encoding convs (timm option).
        down_kernel_size: 2, or 3 for overlapping downsampling convs (official ``overlapped_patch``).
        channel_attn_v2: Florence-2's channel attention (``ops.channel_attention`` version 2).
        named_blocks: name the sub-blocks ``spatial_block``/``channel_block`` instead of ``0``/``1`` (timm's *_fl).
        head_norm_first: LayerNorm on the map before pooling (timm option) instead of pool -> LayerNorm (official).
        norm_eps: epsilon of every LayerNorm.
        global_pool, drop_rate, drop_path_rate: as in timm (drop-path: the official per-sub-block schedule).
        device, dtype: where and in which dtype the parameters are created (timm's factory keywords).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            depths: Sequence[int] = (1, 1, 3, 1),
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            attn_types: Sequence[str] = ("spatial", "channel"),
            ffn: bool = True,
            cpe_act: bool = False,
            down_kernel_size: int = 2,
            channel_attn_v2: bool = False,
            named_blocks: bool = False,
            head_norm_first: bool = False,
            norm_eps: float = 1e-5,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        num_stages = len(depths)
        if not len(embed_dims) == len(num_heads) == num_stages:
            raise ValueError(f"depths, embed_dims and num_heads need one entry per stage, got {len(depths)}, "
                             f"{len(embed_dims)}, {len(num_heads)}")
        if not attn_types or any(t not in ("spatial", "channel") for t in attn_types):
            raise ValueError(f"attn_types must be a non-empty sequence of 'spatial'/'channel', got {attn_types}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, embed_dims[0], norm_eps, **dd)
        # official schedule: one rate per sub-block, linear over all of them
        n_sub, n_all = len(attn_types), len(attn_types) * sum(depths)
        dpr = [drop_path_rate * i / max(n_all - 1, 1) for i in range(n_all)]
        stages, self.feature_info = [], []
        in_chs = embed_dims[0]
        for i in range(num_stages):
            stages.append(DaVitStage(
                in_chs, embed_dims[i], depths[i], i > 0, attn_types, num_heads[i], window_size, mlp_ratio, qkv_bias,
                dpr[n_sub * sum(depths[:i]):n_sub * sum(depths[:i + 1])], ffn, cpe_act, down_kernel_size, 2 if channel_attn_v2 else 1, named_blocks, norm_eps,
                **dd))
            in_chs = embed_dims[i]
            self.feature_info.append(dict(num_chs=in_chs, reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        norm_layer = partial(LayerNorm2d, eps=norm_eps)
        if head_norm_first:  # timm option: norm -> pool -> fc
            self.norm_pre = norm_layer(self.num_features, **dd)
            self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                       **dd)
        else:  # official: pool -> norm -> fc
            self.norm_pre = nn.Identity()
            self.head = NormMlpClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                              drop_rate=drop_rate, norm_layer=norm_layer, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # as the official _init_vit_weights; convs keep PyTorch's default init
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- timm API ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm_pre", (99999,)),
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

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        if isinstance(self.head, NormMlpClassifierHead):
            self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features, **dd)
        else:
            self.head.reset(num_classes, global_pool, **dd)

    def _check_input(self, x: torch.Tensor) -> None:
        # any H, W >= 1 works: stem, downsamples and windows pad right/bottom as the official code
        check_input(x, self.in_chans, name="DaViT")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW; ``norm=True`` applies ``norm_pre`` to the last one) and the final features."""
        if output_fmt != "NCHW":
            raise ValueError("DaViT's intermediates are NCHW only")
        self._check_input(x)
        x = self.stem(x)
        return stage_intermediates(x, self.stages, indices, norm, stop_early, intermediates_only,
                                   final_norm=self.norm_pre)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:  # norm_pre is sized for the last stage
            self.norm_pre = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm_pre(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- checkpoint conversion -----------------------------------------------------------------------------------
# official repo (dingmyu/davit) -> ours
_OFFICIAL_RULES = [
    (r"^patch_embeds\.0\.proj\.", "stem.conv."),
    (r"^patch_embeds\.0\.norm\.", "stem.norm."),
    (r"^patch_embeds\.(\d+)\.proj\.", r"stages.\1.downsample.conv."),
    (r"^patch_embeds\.(\d+)\.norm\.", r"stages.\1.downsample.norm."),
    (r"^main_blocks\.(\d+)\.", r"stages.\1.blocks."),
    (r"\.cpe\.0\.", ".cpe1."),
    (r"\.cpe\.1\.", ".cpe2."),
    (r"^head\.", "head.fc."),
    (r"^norms\.", "head.norm."),
]
# Florence-2 image encoder (keys under 'vision_tower.') -> ours
_FLORENCE_RULES = [
    (r"^convs\.0\.proj\.", "stem.conv."),
    (r"^convs\.0\.norm\.", "stem.norm."),
    (r"^convs\.(\d+)\.proj\.", r"stages.\1.downsample.conv."),
    (r"^convs\.(\d+)\.norm\.", r"stages.\1.downsample.norm."),
    (r"^blocks\.(\d+)\.", r"stages.\1.blocks."),
    (r"\.conv1\.fn\.dw\.", ".cpe1.proj."),
    (r"\.conv2\.fn\.dw\.", ".cpe2.proj."),
    (r"\.(window|channel)_attn\.norm\.", ".norm1."),
    (r"\.(window|channel)_attn\.fn\.", ".attn."),
    (r"\.ffn\.norm\.", ".norm2."),
    (r"\.ffn\.fn\.net\.", ".mlp."),
]


def _remap(sd: Dict[str, Any], rules: Sequence[Tuple[str, str]]) -> Dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: DaVit) -> Dict[str, torch.Tensor]:
    """Load any of the three published layouts into ``model``:

    * timm's hub checkpoints (``stem.conv.weight``...): our layout, passed through;
    * the official repo's (``patch_embeds.0.proj.weight``..., as published under ``'model'``/``'state_dict'``, EMA
      copies preferred, ``module.`` prefixes stripped): renamed;
    * Florence-2's (``vision_tower.convs.0.proj.weight``...): the image encoder's keys renamed; the language model,
      image projection and position embeddings are dropped (not part of the encoder). Florence-2 deletes the
      encoder's pooled-head norm and classifier before training (it uses the unpooled last stage map), so those
      keep this model's own values.

    The classifier is dropped when the model has none (``num_classes=0``); timm's loader adapts it otherwise.
    """
    sd = unwrap_checkpoint(state_dict)
    if "patch_embeds.0.proj.weight" in sd:
        sd = _remap(sd, _OFFICIAL_RULES)
    elif "vision_tower.convs.0.proj.weight" in sd:
        prefix = "vision_tower."
        sd = _remap({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, _FLORENCE_RULES)
        own = model.state_dict()
        sd.update({k: v for k, v in own.items() if k.startswith(("head.", "norm_pre.")) and k not in sd})
    if not model.num_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.fc.")}
    check_state_dict(sd, model)
    return sd


# ---- variants --------------------------------------------------------------------------------------------------
def _create_davit(variant: str, pretrained: bool = False, **kwargs) -> DaVit:
    return build_model(
        DaVit, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    # The authors evaluate with the repo's validate.py (timm 0.4.13 resolve_data_config on the model's cfg
    # 'DaViT_224'): 224x224, resize shorter side to 224 / 0.9, center crop, bicubic, ImageNet mean/std; no test-time
    # pool at the native size. (timm's own davit cfgs use crop_pct 0.95.)
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv", "classifier": "head.fc",
        "license": "mit", "paper_ids": "arXiv:2204.03645",
        "paper_name": "DaViT: Dual Attention Vision Transformers",
        "origin_url": "https://github.com/dingmyu/davit",
        **kwargs,
    }


# The authors' release (README of dingmyu/davit): OneDrive share pages, not direct downloads; the same weights are
# on the HF hub as timm/davit_*.msft_in1k (timm layout), which timm prefers when hf_hub_id is set.
_ONEDRIVE = "https://connecthkuhk-my.sharepoint.com/:u:/g/personal/u3007305_connect_hku_hk/"
_FLORENCE = dict(
    # Florence-2 processor: resize (squash) to 768x768, bicubic, rescale 1/255, ImageNet mean/std, no crop
    num_classes=0, input_size=(3, 768, 768), pool_size=(24, 24), crop_pct=1.0, crop_mode="squash",
    paper_ids="arXiv:2311.06242",
    paper_name="Florence-2: Advancing a Unified Representation for a Variety of Vision Tasks",
)
default_cfgs = generate_default_cfgs({
    # official ImageNet-1K val top-1 in the comments
    "davit_t.msft_in1k": _cfg(  # 82.8
        hf_hub_id="timm/davit_tiny.msft_in1k",
        url=_ONEDRIVE + "EcJYlVYP9y5FsDbMP-nwjtABgLmdrNGZBxgR5--Kg3MZ7Q?e=v9OrXB"),
    "davit_s.msft_in1k": _cfg(  # 84.2
        hf_hub_id="timm/davit_small.msft_in1k",
        url=_ONEDRIVE + "ERN_Gzm8oKdIvO01r0X2cscB_owuRAnnQPNGJEVGP23xHQ?e=MVW3ZO"),
    "davit_b.msft_in1k": _cfg(  # 84.6
        hf_hub_id="timm/davit_base.msft_in1k",
        url=_ONEDRIVE + "Ea8kCpdM949CvTM0w7DWbGwBxxiACMSik4zx-emrNY0uKQ?e=aEjC7u"),
    # no released weights: official DaViT_large_window12_384 cfg ('DaViT_384': 384, crop_pct 1.0)
    "davit_l": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    "davit_h": _cfg(),  # DaViT-H/-G: paper only (1.5B image-text pretraining), no weights released
    "davit_g": _cfg(),
    # Florence-2 image encoders (no classifier): the weights come from the full Florence-2 checkpoints
    "davit_b_fl.msft_florence2": _cfg(hf_hub_id="microsoft/Florence-2-base",
                                      origin_url="https://huggingface.co/microsoft/Florence-2-base", **_FLORENCE),
    "davit_h_fl.msft_florence2": _cfg(hf_hub_id="microsoft/Florence-2-large",
                                      origin_url="https://huggingface.co/microsoft/Florence-2-large", **_FLORENCE),
})


@register_model
def davit_t(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-T (28.4M params)."""
    args = dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("davit_t", pretrained, **dict(args, **kwargs))


@register_model
def davit_s(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-S (49.7M params)."""
    args = dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("davit_s", pretrained, **dict(args, **kwargs))


@register_model
def davit_b(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-B (88.0M params)."""
    args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
    return _create_davit("davit_b", pretrained, **dict(args, **kwargs))


@register_model
def davit_l(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-L (196.8M params), window 12 as the official DaViT_large_window12_384."""
    args = dict(depths=(1, 1, 9, 1), embed_dims=(192, 384, 768, 1536), num_heads=(6, 12, 24, 48), window_size=12)
    return _create_davit("davit_l", pretrained, **dict(args, **kwargs))


@register_model
def davit_h(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-H (348.9M params)."""
    args = dict(depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64))
    return _create_davit("davit_h", pretrained, **dict(args, **kwargs))


@register_model
def davit_g(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-G (1.4B params)."""
    args = dict(depths=(1, 1, 12, 3), embed_dims=(384, 768, 1536, 3072), num_heads=(12, 24, 48, 96))
    return _create_davit("davit_g", pretrained, **dict(args, **kwargs))


_FL_ARGS = dict(window_size=12, down_kernel_size=3, channel_attn_v2=True, named_blocks=True)


@register_model
def davit_b_fl(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-B image encoder of Florence-2-base."""
    args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), **_FL_ARGS)
    return _create_davit("davit_b_fl", pretrained, **dict(args, **kwargs))


@register_model
def davit_h_fl(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-H image encoder of Florence-2-large."""
    args = dict(depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64), **_FL_ARGS)
    return _create_davit("davit_h_fl", pretrained, **dict(args, **kwargs))
