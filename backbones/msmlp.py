"""MS-MLP (Mix-Shift-MLP) for timm.

Paper: "Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs" (Zheng, He, Chen, Zhou),
https://arxiv.org/abs/2202.06510. Official code: https://github.com/JegZheng/MS-MLP (models/ms_mlp.py), MIT.

A four-stage hierarchical MLP. Each MixShiftBlock is ``x + gamma * MLP(LN(mix_shift(x)))``: the channels are split
into 5 groups (as ``torch.chunk``: the last group is smaller), group g is rolled circularly by shift g in {-2..2}
along W and, separately, along H, each rolled copy is mixed by a depthwise conv whose kernel grows with the shift
distance (1, 3, 5, 7), and the two directions are summed. There is no norm before the mixing and no residual around
it alone. The whole mixer is one op, ``ops.mix_shift`` (see its docstring for the exact semantics).

The official file registers no models; the variants are its three yaml configs (``msmlp_{tiny,small,base}_patch4_
shift5_224``): patch 4, shift_dist (-2, -1, 0, 1, 2) and mix sizes ((1,1,3,5,7), (1,3,3,5,7), (1,5,5,5,7),
(1,7,7,7,7)). Those are NOT the class defaults of ``MS_MLP`` nor config.py's default SHIFT_SIZE 7: ours are the
configs' values.

Key layout vs the official code: ``patch_embed.{proj,norm}`` -> ``stem.{0,1}``; ``layers.i`` -> ``stages.i``, with
the downsampling ``PatchEmbed`` at the END of official stage i (``layers.i.downsample.{proj,norm}``) moved to the
START of our stage i+1 (``stages.{i+1}.downsample.{0,1}``, a 2x2/2 conv then LayerNorm), so stage outputs are the
official stage outputs before downsampling; in blocks ``dwconv_lr.g``/``dwconv_td.g`` -> ``mixer.lr.g``/
``mixer.td.g`` and ``pwconv1``/``pwconv2`` -> ``mlp.fc1``/``mlp.fc2``; ``norm`` (LayerNorm of the pooled vector)
-> ``head.norm``; ``head`` -> ``head.fc``. The official ``PatchMerging`` class is never instantiated (dead code).

Differences from the official code, none of which changes an official checkpoint's outputs: any input size of at
least 32 pixels works (official: exactly ``img_size``); ``drop_rate`` is timm's pre-classifier dropout (official: a
dropout after the stem; 0 in all official configs); ``drop_path_rate`` defaults to 0 (official training used 0.1 /
0.4 / 0.5 for tiny / small / base).
"""
from __future__ import annotations

import collections
import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, Mlp, NormMlpClassifierHead, get_device_dtype
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ops import DWConv2d
from ops.mix_shift import mix_shift, mix_shift_chunk_sizes

from ._common import build_model, check_input, check_state_dict, stage_intermediates, unwrap_checkpoint

__all__ = ["MSMLP"]

_MIX_SIZE = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
_SHIFT_DIST = (-2, -1, 0, 1, 2)


class MixShift(nn.Module):
    """Token mixer: per channel group g, depthwise conv ``mix_size[g]`` of the input rolled by ``shift_dist[g]``
    along W (``lr``) plus the same along H (``td``), through ``ops.mix_shift``. Parameters live in ``DWConv2d``s."""

    def __init__(self, dim: int, shift_dist: Sequence[int], mix_size: Sequence[int], device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if len(mix_size) != len(shift_dist):
            raise ValueError(f"mix_size {tuple(mix_size)} needs one kernel size per shift in {tuple(shift_dist)}")
        chunks = mix_shift_chunk_sizes(dim, len(shift_dist))
        self.shift_dist = tuple(shift_dist)
        self.lr = nn.ModuleList(DWConv2d(c, k, **dd) for c, k in zip(chunks, mix_size))
        self.td = nn.ModuleList(DWConv2d(c, k, **dd) for c, k in zip(chunks, mix_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = ([m.weight for m in self.lr], [m.weight for m in self.td])
        biases = ([m.bias for m in self.lr], [m.bias for m in self.td])
        return mix_shift(x, weights, biases, self.shift_dist)


class MixShiftBlock(nn.Module):
    """``x + drop_path(gamma * fc2(GELU(fc1(LN(mix_shift(x))))))``; the LN and MLP act channels-last."""

    def __init__(self, dim: int, shift_dist: Sequence[int], mix_size: Sequence[int], mlp_ratio: float,
                 drop_path: float, ls_init_value: float, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.mixer = MixShift(dim, shift_dist, mix_size, **dd)
        self.norm = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, **dd)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value, **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mixer(x).permute(0, 2, 3, 1)
        y = self.gamma * self.mlp(self.norm(y))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class MSMLPStage(nn.Module):
    """Optional downsampling (2x2 stride-2 conv, then LayerNorm: the official PatchEmbed), then MixShiftBlocks."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, shift_dist: Sequence[int],
                 mix_size: Sequence[int], mlp_ratio: float, drop_path: Sequence[float], ls_init_value: float,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 2, 2, **dd), LayerNorm2d(out_chs, eps=1e-6, **dd))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            MixShiftBlock(out_chs, shift_dist, mix_size, mlp_ratio, drop_path[d], ls_init_value, **dd)
            for d in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class MSMLP(nn.Module):
    """MS-MLP: patch-embedding stem (conv k=s=patch_size + LayerNorm), four stages of MixShiftBlocks with the width
    doubling at each stride-2 downsampling, head = global average pool -> LayerNorm -> (dropout) -> Linear.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for no classifier).
        embed_dim: width of the first stage (doubles per stage).
        depths: blocks per stage.
        patch_size: stem stride.
        shift_dist: shift of each channel group (the number of shifts is the number of groups).
        mix_size: per stage, the depthwise kernel size of each channel group.
        mlp_ratio: MLP expansion.
        ls_init_value: initial layer-scale ``gamma``.
        global_pool, drop_rate, drop_path_rate: as in timm.
        device, dtype: where and in which dtype the parameters are created (timm's factory keywords).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depths: Sequence[int] = (3, 3, 9, 3),
            patch_size: int = 4,
            shift_dist: Sequence[int] = _SHIFT_DIST,
            mix_size: Sequence[Sequence[int]] = _MIX_SIZE,
            mlp_ratio: float = 4.0,
            ls_init_value: float = 1e-6,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        num_stages = len(depths)
        if len(mix_size) != num_stages:
            raise ValueError(f"mix_size has {len(mix_size)} entries but depths has {num_stages} stages")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.stem = nn.Sequential(nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, **dd),
                                  LayerNorm2d(embed_dim, eps=1e-6, **dd))
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        prev, reduction = embed_dim, patch_size
        for i in range(num_stages):
            dim = embed_dim * 2 ** i
            reduction = patch_size * 2 ** i
            stages.append(MSMLPStage(prev, dim, depths[i], i > 0, shift_dist, mix_size[i], mlp_ratio, dpr[i],
                                     ls_init_value, **dd))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.stride = reduction
        self.num_features = self.head_hidden_size = prev
        # official: avgpool -> flatten -> LayerNorm(eps 1e-6) -> Linear
        self.head = NormMlpClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-6), **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as the official code: Linear trunc-normal(0.02) with zero bias; convs keep PyTorch's default init
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
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
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """New classifier; ``reset_other`` also removes the head's LayerNorm (leaving pool + classifier)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
                        **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def _check_input(self, x: torch.Tensor) -> None:
        # any size of at least the total stride works (odd sizes are floored by the strided convs, as in ConvNeXt)
        check_input(x, self.in_chans, min_size=self.stride, name="MSMLP")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW) and the final feature map. ``norm`` has no effect: MS-MLP's only final norm acts on
        the pooled vector, inside the head."""
        if output_fmt != "NCHW":
            raise ValueError("MSMLP's intermediates are NCHW only")
        self._check_input(x)
        x = self.stem(x)
        return stage_intermediates(x, self.stages, indices, norm, stop_early, intermediates_only)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head or max_index < len(self.feature_info) - 1:  # the head is sized for the last stage
            self.num_features = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.stages(self.stem(x))  # grad checkpointing acts inside the stages

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- checkpoint conversion -----------------------------------------------------------------------------------
def _official_key(k: str) -> str:
    k = re.sub(r"^patch_embed\.proj\.", "stem.0.", k)
    k = re.sub(r"^patch_embed\.norm\.", "stem.1.", k)
    # official stage i ends with the downsampling PatchEmbed; ours starts stage i+1 with it
    k = re.sub(r"^layers\.(\d+)\.downsample\.(proj|norm)\.",
               lambda m: f"stages.{int(m[1]) + 1}.downsample.{0 if m[2] == 'proj' else 1}.", k)
    k = re.sub(r"^layers\.", "stages.", k)
    for old, new in ((".dwconv_lr.", ".mixer.lr."), (".dwconv_td.", ".mixer.td."),
                     (".pwconv1.", ".mlp.fc1."), (".pwconv2.", ".mlp.fc2.")):
        k = k.replace(old, new)
    k = re.sub(r"^norm\.", "head.norm.", k)
    return re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)


# The released files are Swin-style training checkpoints that pickle the run's yacs CfgNode under 'config'. timm
# downloads with torch.load(weights_only=True), which refuses unknown classes; CfgNode is a dict subclass with one
# attribute, so let the safe unpickler read it as a collections.Counter (also a dict subclass with a __dict__): the
# weights load without yacs and without unpickling arbitrary code (tests/test_pretrained_download.py).
torch.serialization.add_safe_globals([(collections.Counter, "yacs.config.CfgNode")])


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: MSMLP) -> Dict[str, torch.Tensor]:
    """Convert an official MS-MLP checkpoint (as published: the model under 'model', next to optimizer state).

    The official state_dict holds exactly the model's parameters (no buffers, nothing unused), so nothing is dropped.
    Checkpoints already in our layout pass through unchanged.
    """
    sd = unwrap_checkpoint(state_dict)
    if "stem.0.weight" not in sd:  # official layout
        sd = {_official_key(k): v for k, v in sd.items()}
    check_state_dict(sd, model)
    return sd


# ---- variants --------------------------------------------------------------------------------------------------
def _create_msmlp(variant: str, pretrained: bool = False, **kwargs) -> MSMLP:
    return build_model(
        MSMLP, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_RELEASE = "https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/"


def _cfg(file: str = "", **kwargs) -> Dict[str, Any]:
    # The official eval (data/build.py, TEST.CROP=True): Resize(int(256 / 224 * 224) = 256, bicubic) ->
    # CenterCrop(224) -> ImageNet mean/std, i.e. crop_pct 0.875; DATA.INTERPOLATION 'bicubic' (config.py default,
    # not overridden by the yaml configs). The official eval loads checkpoint['model'] (no EMA was trained).
    return {
        "url": _RELEASE + file if file else "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "head.fc",
        "license": "mit", "paper_ids": "arXiv:2202.06510",
        "paper_name": "Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs",
        "origin_url": "https://github.com/JegZheng/MS-MLP",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # official top-1 (ImageNet-1K val, 224) in the comments
    "msmlp_t.in1k": _cfg("msmlp_tiny_patch4/msmlp_tiny_patch4_ckpt_epoch299.pth"),  # 82.1
    "msmlp_s.in1k": _cfg("msmlp_small_patch4/msmlp_small_patch4_ckpt_epoch299.pth"),  # 83.4
    "msmlp_b.in1k": _cfg("msmlp_base_patch4/msmlp_base_patch4_ckpt_epoch299.pth"),  # 83.8
})


@register_model
def msmlp_t(pretrained: bool = False, **kwargs) -> MSMLP:
    """MS-MLP-Tiny (28.7M params; official config msmlp_tiny_patch4_shift5_224, trained with drop_path 0.1)."""
    args = dict(embed_dim=96, depths=(3, 3, 9, 3))
    return _create_msmlp("msmlp_t", pretrained, **dict(args, **kwargs))


@register_model
def msmlp_s(pretrained: bool = False, **kwargs) -> MSMLP:
    """MS-MLP-Small (50.3M params; official config msmlp_small_patch4_shift5_224, trained with drop_path 0.4)."""
    args = dict(embed_dim=96, depths=(3, 3, 27, 3))
    return _create_msmlp("msmlp_s", pretrained, **dict(args, **kwargs))


@register_model
def msmlp_b(pretrained: bool = False, **kwargs) -> MSMLP:
    """MS-MLP-Base (88.7M params; official config msmlp_base_patch4_shift5_224, trained with drop_path 0.5)."""
    args = dict(embed_dim=128, depths=(3, 3, 27, 3))
    return _create_msmlp("msmlp_b", pretrained, **dict(args, **kwargs))
