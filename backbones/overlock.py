"""OverLoCK for timm.

Paper: "OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels" (Lou, Yu,
CVPR 2025), https://arxiv.org/abs/2502.20087
Official code: https://github.com/LMMMEng/OverLoCK (models/overlock.py), Apache-2.0.

A branched ConvNet of three sub-networks:
  * Base-Net: conv stem + stages 1-3 of RepConvBlocks (UniRepLKNet-style dilated re-parameterisable large-kernel
    depthwise conv, SE, GRN MLP);
  * Overview-Net: one more downsample + RepConvBlocks at 1/32, giving a coarse global context ``ctx``;
  * Focus-Net: DynamicConvBlocks at 1/16 and 1/32 that carry ``ctx`` along as extra channels and mix tokens with
    ContMix: per-pixel dynamic kernels (k x k and 5 x 5) computed from the affinity of every pixel to a 7 x 7 pooled
    context, applied with NATTEN-style neighbourhood aggregation (``ops.na2d_av``; windows shifted inside the map at
    borders) plus a large-kernel depthwise "lepe" branch.
The classifier reads the fused 1/32 Focus-Net map; an auxiliary head on the Overview-Net context adds deep
supervision during training (see :class:`OverLoCK`).

Hub names: ``overlock_xt/_t/_s/_b`` (training form, with the dilated branches and the auxiliary head) and
``overlock_{xt,t,s,b}_reparam`` (deploy form: each DilatedReparamBlock is one k x k depthwise conv with bias).
``model.reparameterize()`` turns the training form into the deploy form in place (official ``reparam()``).

Key layout: module names are the official ones, except three timm layers replacing the official ones:
SE ``*.proj.{1,3}`` -> ``*.fc1``/``*.fc2``, GRN ``gamma``/``beta`` ``(1, C, 1, 1)`` -> ``weight``/``bias`` ``(C,)``,
and the heads ``head.{0,1,4}`` -> ``head.{proj,norm,fc}``, ``aux_head.{0,2}`` -> ``aux_head.{norm,fc}`` (the 1x1-conv
classifiers become Linear). ``checkpoint_filter_fn`` converts official checkpoints.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (DropPath, LayerNorm2d, SelectAdaptivePool2d, SEModule, get_device_dtype,
                         register_notrace_function)
from timm.layers.grn import GlobalResponseNorm
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ops import DWConv2d
from ops.na2d import na2d_av, na2d_rpb

from ._common import build_model, check_input, check_state_dict, ofq_attention, unwrap_checkpoint

__all__ = ["OverLoCK"]


def _fuse_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a bias-free conv into (weight, bias)."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _conv_bn(in_chs: int, out_chs: int, stride: int = 1, **dd) -> List[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False, **dd), nn.BatchNorm2d(out_chs, **dd)]


def _se(dim: int, **dd) -> SEModule:
    return SEModule(dim, rd_channels=max(16, dim // 8), act_layer=nn.GELU, **dd)


def _grn(dim: int, **dd) -> GlobalResponseNorm:
    return GlobalResponseNorm(dim, eps=1e-6, channels_last=False, **dd)


class ResDWConv(DWConv2d):
    """``x + dwconv(x)`` (depthwise k x k with bias)."""

    def __init__(self, dim: int, kernel_size: int = 3, device=None, dtype=None):
        super().__init__(dim, kernel_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class LayerScale(nn.Module):
    """Per-channel affine ``x * weight + bias`` (official: a grouped 1x1 conv, weight ``(C, 1, 1, 1)``)."""

    def __init__(self, dim: int, init_value: float = 1e-5, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value), **dd))
        self.bias = nn.Parameter(torch.zeros(dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet's dilated re-parameterisable depthwise conv: a k x k conv+BN plus dilated small-kernel conv+BN
    branches (training form), or one k x k conv with bias (deploy form, after :meth:`reparameterize`)."""

    _BRANCHES = {  # kernel_size -> (branch kernel sizes, dilations), as the official code
        17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
        15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
        13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
        11: ((5, 7, 5, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
        9: ((5, 7, 5, 3, 3), (1, 1, 2, 3, 4)),
        7: ((5, 3, 3, 3), (1, 1, 2, 3)),
        5: ((3, 3), (1, 2)),
    }

    def __init__(self, dim: int, kernel_size: int, deploy: bool = False, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if kernel_size not in self._BRANCHES:
            raise ValueError(f"DilatedReparamBlock supports kernel sizes {sorted(self._BRANCHES)}, got {kernel_size}")
        self.lk_origin = DWConv2d(dim, kernel_size, bias=deploy, **dd)
        self.branches = list(zip(*self._BRANCHES[kernel_size]))
        self.deploy = deploy
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(dim, **dd)
            for k, r in self.branches:
                setattr(self, f"dil_conv_k{k}_{r}", DWConv2d(dim, k, dilation=r, bias=False, **dd))
                setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in self.branches:
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every branch (BN folded in) into ``lk_origin`` in place; a no-op in the deploy form."""
        if self.deploy:
            return
        weight, bias = _fuse_bn(self.lk_origin.weight, self.origin_bn)
        size = weight.shape[-1]
        for k, r in self.branches:
            w, b = _fuse_bn(getattr(self, f"dil_conv_k{k}_{r}").weight, getattr(self, f"dil_bn_k{k}_{r}"))
            span = r * (k - 1) + 1
            dense = w.new_zeros(w.shape[0], 1, span, span)
            dense[:, :, ::r, ::r] = w  # the dilated kernel as an equivalent dense one
            weight = weight + F.pad(dense, [(size - span) // 2] * 4)
            bias = bias + b
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        del self.origin_bn
        self.lk_origin.weight.copy_(weight)
        self.lk_origin.bias = nn.Parameter(bias)
        self.deploy = True


class CTXDownsample(nn.Module):
    """Downsample the Focus-Net features and the context channels they carry (3x3 stride-2 conv + BN each)."""

    def __init__(self, dim: int, h_dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.x_proj = nn.Sequential(*_conv_bn(dim, h_dim, 2, **dd))
        self.h_proj = nn.Sequential(*_conv_bn(h_dim // 4, h_dim // 4, 2, **dd))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(ctx)


class RepConvBlock(nn.Module):
    """Base-/Overview-Net block: ``x = x + dw3x3(x)``, then ``ls(x) + proj(x)`` (``res_scale``) or
    ``x + ls(proj(x))``, where proj = LN -> dilated large-kernel dwconv -> BN -> SE -> 1x1 -> GELU -> res-dw3x3 ->
    GRN -> 1x1."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4, ls_init_value: Optional[float] = None,
                 res_scale: bool = False, drop_path: float = 0.0, deploy: bool = False, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.res_scale = res_scale
        self.dwconv = ResDWConv(dim, 3, **dd)
        self.proj = nn.Sequential(
            LayerNorm2d(dim, eps=1e-6, **dd),
            DilatedReparamBlock(dim, kernel_size, deploy, **dd),
            nn.BatchNorm2d(dim, **dd),
            _se(dim, **dd),
            nn.Conv2d(dim, mlp_dim, 1, **dd),
            nn.GELU(),
            ResDWConv(mlp_dim, 3, **dd),
            _grn(mlp_dim, **dd),
            nn.Conv2d(mlp_dim, dim, 1, **dd),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ls = LayerScale(dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        if self.res_scale:
            return self.ls(x) + self.drop_path(self.proj(x))
        return x + self.drop_path(self.ls(self.proj(x)))


# ContMix's size-dependent steps are leaves for torch.fx (public names: FX wraps no "_" names): they branch on
# the map size, which tracing does not know.
@register_notrace_function
def upsize_to_window(x: torch.Tensor, x_f: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bilinearly up-size ``x`` and ``x_f`` so the shorter side is ``k`` (official ``is_pad``), when it is shorter."""
    H, W = x.shape[-2:]
    if min(H, W) >= k:
        return x, x_f
    H, W = (k, int(k / H * W)) if H < W else (int(k / W * H), k)
    return (F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False),
            F.interpolate(x_f, size=(H, W), mode="bilinear", align_corners=False))


@register_notrace_function
def pool_to_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Average-pool an up-sized map back to ``size`` (the inverse step of :func:`upsize_to_window`)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


@ofq_attention("overlock_contmix")
class DynamicConvBlock(nn.Module):
    """Focus-Net block with ContMix. Input: features ``x`` (``dim`` channels) and the context channels ``h_x``
    (``ctx_dim // 4``) it carries; ``h_r`` is the Overview-Net context the carried one is re-mixed with
    (``h_x = x_scale(h_x) + h_scale(h_r)``, except in the first block). Returns the fused ``dim + ctx_dim // 4`` map.

    ContMix: query = BN(1x1(norm(x_f)[:dim])) * head_dim**-0.5, key = BN(1x1(pool7x7(norm(x_f)[dim:]))); per head
    the affinities of each pixel to the 49 pooled positions are projected (``weight_proj``, 49 -> 5^2 + k^2) into a
    5 x 5 and a k x k dynamic kernel (+ relative-position bias, softmax) that aggregate the first / second half of
    the channels over each pixel's neighbourhood (``na2d_av``). Maps smaller than k are bilinearly up-sized to at
    least k x k for this and average-pooled back (official ``is_pad``).
    """

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int = 7, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 4, ls_init_value: Optional[float] = None, res_scale: bool = False,
                 drop_path: float = 0.0, is_first: bool = False, deploy: bool = False, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if dim % (4 * num_heads):
            raise ValueError(f"ContMix splits dim={dim} into 2 kernels x {2 * num_heads} heads: dim must be a "
                             f"multiple of 4 * num_heads = {4 * num_heads}")
        ctx_dim = ctx_dim // 4
        out_dim = dim + ctx_dim
        mlp_dim = int(dim * mlp_ratio)
        self.kernel_size = kernel_size
        self.smk_size = smk_size
        self.res_scale = res_scale
        self.num_heads = num_heads * 2
        self.scale = (dim // self.num_heads) ** -0.5  # official: dim // (2 * heads), not the query's head width

        if not is_first:
            self.x_scale = LayerScale(ctx_dim, init_value=1, **dd)
            self.h_scale = LayerScale(ctx_dim, init_value=1, **dd)
        self.dwconv1 = ResDWConv(out_dim, 3, **dd)
        self.norm1 = LayerNorm2d(out_dim, eps=1e-6, **dd)
        self.fusion = nn.Sequential(
            DWConv2d(out_dim, 3, **dd), nn.BatchNorm2d(out_dim, **dd), nn.GELU(), nn.Conv2d(out_dim, dim, 1, **dd),
            _grn(dim, **dd))
        self.weight_query = nn.Sequential(nn.Conv2d(dim, dim // 2, 1, bias=False, **dd), nn.BatchNorm2d(dim // 2, **dd))
        self.weight_key = nn.Sequential(
            nn.AdaptiveAvgPool2d(7), nn.Conv2d(ctx_dim, dim // 2, 1, bias=False, **dd), nn.BatchNorm2d(dim // 2, **dd))
        self.weight_proj = nn.Conv2d(49, kernel_size ** 2 + smk_size ** 2, 1, **dd)  # over the 49 pooled positions
        self.dyconv_proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False, **dd), nn.BatchNorm2d(dim, **dd))
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy, **dd), nn.BatchNorm2d(dim, **dd))
        self.se_layer = _se(dim, **dd)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False, **dd), nn.BatchNorm2d(dim, **dd), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim, **dd), nn.Conv2d(dim, out_dim, 1, **dd))
        self.dwconv2 = ResDWConv(out_dim, 3, **dd)
        self.norm2 = LayerNorm2d(out_dim, eps=1e-6, **dd)
        self.mlp = nn.Sequential(
            nn.Conv2d(out_dim, mlp_dim, 1, **dd), nn.GELU(), ResDWConv(mlp_dim, 3, **dd), _grn(mlp_dim, **dd),
            nn.Conv2d(mlp_dim, out_dim, 1, **dd))
        self.ls1 = LayerScale(out_dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.ls2 = LayerScale(out_dim, ls_init_value, **dd) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.rpb1 = nn.Parameter(torch.zeros(self.num_heads, 2 * smk_size - 1, 2 * smk_size - 1, **dd))
        self.rpb2 = nn.Parameter(torch.zeros(self.num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1, **dd))
        self.probs_quant = None  # OFQ sets a quantizer of the two kernels

    def contmix(self, x: torch.Tensor, x_f: torch.Tensor) -> torch.Tensor:
        """Dynamic-kernel aggregation of ``x`` (``[B, dim, H, W]``) steered by the normalised fused map ``x_f``."""
        size = x.shape[-2:]
        k, s, G = self.kernel_size, self.smk_size, self.num_heads
        x, x_f = upsize_to_window(x, x_f, k)  # official is_pad: up-size so the k x k window fits, pool back below
        B, dim, H, W = x.shape
        query, key = x_f.split([dim, x_f.shape[1] - dim], dim=1)
        query = (self.weight_query(query) * self.scale).reshape(B, G, -1, H * W)
        key = self.weight_key(key).reshape(B, G, -1, 49)
        affinity = query.transpose(-1, -2) @ key  # [B, G, HW, 49]
        logits = F.linear(affinity, self.weight_proj.weight.flatten(1), self.weight_proj.bias)
        logits = logits.reshape(B, G, H, W, s * s + k * k)
        attn_s, attn_k = logits.split([s * s, k * k], dim=-1)
        attn_s = (attn_s + na2d_rpb(self.rpb1, H, W, s)).softmax(dim=-1)
        attn_k = (attn_k + na2d_rpb(self.rpb2, H, W, k)).softmax(dim=-1)
        if self.probs_quant is not None:
            attn_s, attn_k = self.probs_quant(attn_s, attn_k)
        value = x.reshape(B, 2, G, dim // (2 * G), H, W).permute(1, 0, 2, 4, 5, 3)  # [2, B, G, H, W, c]
        out = torch.cat([na2d_av(attn_s, value[0], s), na2d_av(attn_k, value[1], k)], dim=1)  # [B, 2G, H, W, c]
        return pool_to_size(out.permute(0, 1, 4, 2, 3).reshape(B, dim, H, W), size)

    def forward(self, x: torch.Tensor, h_x: torch.Tensor, h_r: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "x_scale"):
            h_x = self.x_scale(h_x) + self.h_scale(h_r)
        x_f = self.dwconv1(torch.cat([x, h_x], dim=1))
        identity = x_f
        x_f = self.norm1(x_f)
        x = self.fusion(x_f)
        gate = self.gate(x)
        lepe = self.lepe(x)
        x = self.dyconv_proj(self.contmix(x, x_f))
        x = self.proj(gate * self.se_layer(x + lepe))
        if self.res_scale:
            x = self.ls1(identity) + self.drop_path(x)
        else:
            x = identity + self.drop_path(self.ls1(x))
        x = self.dwconv2(x)
        if self.res_scale:
            return self.ls2(x) + self.drop_path(self.mlp(self.norm2(x)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class OverLoCKHead(nn.Module):
    """Main head ``1x1 conv (no bias) -> BN -> SiLU -> pool -> Linear`` (``hidden_size`` set), or the auxiliary
    head ``BN -> pool -> Linear``."""

    def __init__(self, in_chs: int, num_classes: int, hidden_size: Optional[int] = None, pool_type: str = "avg",
                 drop_rate: float = 0.0, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if hidden_size:
            self.proj = nn.Conv2d(in_chs, hidden_size, 1, bias=False, **dd)
            self.norm = nn.BatchNorm2d(hidden_size, **dd)
            self.act = nn.SiLU()
        else:
            self.proj, self.norm, self.act = nn.Identity(), nn.BatchNorm2d(in_chs, **dd), nn.Identity()
        self.num_features = hidden_size or in_chs
        self.drop = nn.Dropout(drop_rate)
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.reset(num_classes, pool_type, **dd)

    def reset(self, num_classes: int, pool_type: Optional[str] = None, reset_other: bool = False,
              in_features: Optional[int] = None, device=None, dtype=None) -> None:
        """New classifier (and pooling, if ``pool_type`` is given) on the head's device and dtype, in its train/eval
        mode; ``reset_other`` also removes the projection and norm, leaving pool + classifier on ``in_features``
        channels (a model pruned to an earlier stage)."""
        dd = get_device_dtype(self, device=device, dtype=dtype)
        if pool_type is not None:
            if not pool_type and num_classes:
                raise ValueError("global_pool='' (no pooling) needs num_classes=0")
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type)).train(self.training)
        elif num_classes and self.global_pool.is_identity():  # a classifier reads pooled features: default pooling
            self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True).train(self.training)
        if reset_other:
            self.proj, self.norm, self.act = (nn.Identity().train(self.training) for _ in range(3))
            self.num_features = in_features if in_features is not None else self.num_features
        features = self.num_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(self.act(self.norm(self.proj(x)))))
        return x if pre_logits else self.fc(x)


class OverLoCK(nn.Module):
    """OverLoCK: Base-Net (stem, ``blocks1..3``), Overview-Net (``blocks4``), Focus-Net (``sub_blocks3/4``).

    Args (official names):
        depth: RepConvBlocks in Base-Net stages 1-3 and the Overview-Net.
        sub_depth: DynamicConvBlocks in the two Focus-Net stages (1/16 and 1/32).
        embed_dim: widths of the four levels; the Focus-Net carries ``embed_dim[3] // 4`` context channels.
        kernel_size: large depthwise kernel per level (also the ContMix kernel of the Focus-Net stages 3-4).
        mlp_ratio / sub_mlp_ratio: MLP expansion of RepConvBlocks / DynamicConvBlocks.
        sub_num_heads: ContMix heads of the two Focus-Net stages (each kernel size uses this many heads).
        ls_init_value: per-level LayerScale init (None: no LayerScale).
        res_scale: residual form ``ls(x) + f(x)`` (True, every released model) or ``x + ls(f(x))``.
        smk_size: the small ContMix kernel.
        deploy: build the re-parameterised form (to load ``*_reparam`` checkpoints).
        use_ds: build the auxiliary (deep-supervision) head on the Overview-Net context.
        projection: width of the main head's 1x1 projection (= ``head_hidden_size``).
        aux_loss_weight: weight of the auxiliary loss in the official training (``--aux-loss-ratio``, 0.4).
        in_chans, num_classes, global_pool, drop_rate (dropout before the classifiers' Linear), drop_path_rate.
        device, dtype: where and in which dtype the parameters are created (timm's factory keywords).

    Outputs: ``forward`` returns the main logits, in train and eval mode alike, as every timm model does. Deep
    supervision is opt-in, the way timm's distilled models switch theirs on: after ``set_aux_training(True)``,
    ``forward`` in ``train()`` mode returns ``(logits, aux_logits)`` (the official model returns
    ``dict(main=..., aux=...)`` there), and the official train.py minimises
    ``loss_fn(logits, target) + aux_loss_weight * loss_fn(aux_logits, target)`` with the same criterion for both
    (the mixup / label-smoothing soft-target CE) and ``aux_loss_weight = 0.4``. This project's training loop
    (``backbones.training.ImageClassifier``) switches it on and computes that loss. ``eval()`` mode always returns
    the logits only: the aux head is never used at inference. A plain training loop under DDP leaves the aux head
    without gradients unless it switches deep supervision on or builds the model with ``use_ds=False``.

    Weight decay: the official recipe (timm ``create_optimizer_v2``) decays every parameter of 2 or more dims,
    including the relative-position biases ``rpb1/rpb2``, so no ``no_weight_decay`` set is declared.
    """

    def __init__(
            self,
            depth: Sequence[int] = (2, 2, 2, 2),
            sub_depth: Sequence[int] = (4, 2),
            in_chans: int = 3,
            embed_dim: Sequence[int] = (96, 192, 384, 768),
            kernel_size: Sequence[int] = (7, 7, 7, 7),
            mlp_ratio: Sequence[float] = (4, 4, 4, 4),
            sub_mlp_ratio: Sequence[float] = (4, 4),
            sub_num_heads: Sequence[int] = (4, 8),
            ls_init_value: Sequence[Optional[float]] = (None, None, 1, 1),
            res_scale: bool = True,
            smk_size: int = 5,
            deploy: bool = False,
            use_ds: bool = True,
            projection: int = 1024,
            aux_loss_weight: float = 0.4,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if len(depth) != 4 or len(embed_dim) != 4 or len(kernel_size) != 4 or len(sub_depth) != 2:
            raise ValueError("OverLoCK needs 4 entries in depth/embed_dim/kernel_size and 2 in sub_depth")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.aux_loss_weight = aux_loss_weight
        self.aux_training = False  # set_aux_training(True): (logits, aux_logits) in train mode
        self.num_features = fusion_dim = embed_dim[3] + embed_dim[3] // 4
        self.head_hidden_size = projection
        self.grad_checkpointing = False
        self._last_stage = 3  # lowered by prune_intermediate_layers

        self.patch_embed1 = nn.Sequential(
            *_conv_bn(in_chans, embed_dim[0] // 2, 2, **dd), nn.GELU(),
            *_conv_bn(embed_dim[0] // 2, embed_dim[0] // 2, **dd), nn.GELU(),
            *_conv_bn(embed_dim[0] // 2, embed_dim[0], 2, **dd), nn.GELU(),
            *_conv_bn(embed_dim[0], embed_dim[0], **dd))
        self.patch_embed2 = nn.Sequential(*_conv_bn(embed_dim[0], embed_dim[1], 2, **dd))
        self.patch_embed3 = nn.Sequential(*_conv_bn(embed_dim[1], embed_dim[2], 2, **dd))
        self.patch_embed4 = nn.Sequential(*_conv_bn(embed_dim[2], embed_dim[3], 2, **dd))
        self.high_level_proj = nn.Conv2d(embed_dim[3], embed_dim[3] // 4, 1, **dd)
        self.patch_embedx = CTXDownsample(embed_dim[2], embed_dim[3], **dd)

        counts = [*depth, *sub_depth]
        dpr = [d.tolist() for d in torch.linspace(0, drop_path_rate, sum(counts), device="cpu").split(counts)]
        for i in range(4):
            self.add_module(f"blocks{i + 1}", nn.ModuleList([
                RepConvBlock(embed_dim[i], kernel_size[i], mlp_ratio[i], ls_init_value[i], res_scale, dpr[i][j], deploy,
                             **dd)
                for j in range(depth[i])]))
        for i, level in enumerate((2, 3)):
            self.add_module(f"sub_blocks{level + 1}", nn.ModuleList([
                DynamicConvBlock(embed_dim[level], embed_dim[3], kernel_size[level], smk_size, sub_num_heads[i],
                                 sub_mlp_ratio[i], ls_init_value[level], res_scale, dpr[4 + i][j],
                                 is_first=(level == 2 and j == 0), deploy=deploy, **dd)
                for j in range(sub_depth[i])]))

        self.aux_head = OverLoCKHead(embed_dim[3], num_classes, pool_type=global_pool, **dd) if use_ds else None
        self.head = OverLoCKHead(fusion_dim, num_classes, projection, global_pool, drop_rate, **dd)
        self.feature_info = [
            dict(num_chs=embed_dim[0], reduction=4, module="blocks1"),
            dict(num_chs=embed_dim[1], reduction=8, module="blocks2"),
            dict(num_chs=embed_dim[2] + embed_dim[3] // 4, reduction=16, module="sub_blocks3"),
            dict(num_chs=fusion_dim, reduction=32, module="sub_blocks4"),
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def reparameterize(self) -> "OverLoCK":
        """Training form -> deploy form in place (official ``reparam()``); outputs are unchanged in eval mode."""
        for m in self.modules():
            if isinstance(m, DilatedReparamBlock):
                m.reparameterize()
        return self

    # ---- timm API ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # execution order: stem, Base-Net / Overview-Net levels 1-4, Focus-Net stage 3, Focus-Net stage 4
        return dict(
            stem=r"^patch_embed1\.",
            blocks=r"^(?:patch_embed|blocks)(\d+)" if coarse else [
                (r"^patch_embed(\d+)", (0,)), (r"^blocks(\d+)\.(\d+)", None)],
            focus3=r"^(?:high_level_proj|sub_blocks3)" if coarse else [
                (r"^high_level_proj", (0,)), (r"^sub_blocks3\.(\d+)", None)],
            focus4=r"^(?:patch_embedx|sub_blocks4)" if coarse else [
                (r"^patch_embedx", (0,)), (r"^sub_blocks4\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_aux_training(self, enable: bool = True) -> None:
        """Deep supervision on/off: when on, ``forward`` in train mode returns ``(logits, aux_logits)`` (weight the
        auxiliary loss by ``aux_loss_weight``). No effect on a model built without the aux head (``use_ds=False``)."""
        self.aux_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head.reset(num_classes, global_pool, **dd)
        if self.aux_head is not None:
            self.aux_head.reset(num_classes, global_pool, **dd)

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, *args)
        return block(*args)

    def _focus_stage(self, blocks: nn.ModuleList, x: torch.Tensor, h_x: torch.Tensor, h_r: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            fused = self._run(blk, x, h_x, h_r)
            x, h_x = fused.split([x.shape[1], h_x.shape[1]], dim=1)
        return fused

    def _forward_stages(self, x: torch.Tensor, last_stage: Optional[int] = None
                        ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """Outputs of stages 0..``last_stage`` (blocks1, blocks2, Focus-Net 1/16 and 1/32, fused maps; default: every
        stage ``prune_intermediate_layers`` kept) and the Overview-Net context (None when ``last_stage < 2``)."""
        if last_stage is None:
            last_stage = self._last_stage
        check_input(x, self.in_chans, name="OverLoCK")  # any size >= 1 works (small maps take the is_pad path)
        outs, ctx = [], None
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = self._run(blk, x)
        outs.append(x)
        if last_stage >= 1:
            x = self.patch_embed2(x)
            for blk in self.blocks2:
                x = self._run(blk, x)
            outs.append(x)
        if last_stage >= 2:
            x = self.patch_embed3(x)
            for blk in self.blocks3:  # Base-Net
                x = self._run(blk, x)
            ctx = self.patch_embed4(x)
            for blk in self.blocks4:  # Overview-Net
                ctx = self._run(blk, ctx)
            ctx_ori = self.high_level_proj(ctx)
            ctx_up = F.interpolate(ctx_ori, size=x.shape[2:], mode="bilinear", align_corners=False)
            outs.append(self._focus_stage(self.sub_blocks3, x, ctx_up, ctx_up))
        if last_stage >= 3:
            x, h_x = outs[-1].split([x.shape[1], ctx_up.shape[1]], dim=1)
            x, h_x = self.patch_embedx(x, h_x)
            outs.append(self._focus_stage(self.sub_blocks4, x, h_x, ctx_ori))
        return outs, ctx

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (blocks1, blocks2, Focus-Net 1/16 and 1/32 fused maps); there are no final norms, so
        ``norm`` changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError("OverLoCK's intermediates are NCHW only")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_stage = max_index if stop_early else self._last_stage
        if max_index > self._last_stage:
            raise ValueError(f"stage {max_index} was pruned (prune_intermediate_layers kept 0..{self._last_stage})")
        outs, _ = self._forward_stages(x, last_stage)
        intermediates = [outs[i] for i in take_indices]
        return intermediates if intermediates_only else (outs[-1], intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self._last_stage = max_index
        if max_index < 3:  # the head reads the fused 1/32 map
            self.num_features = self.feature_info[max_index]["num_chs"]
            prune_head = True
            self.patch_embedx, self.sub_blocks4 = nn.Identity(), nn.ModuleList()
        if max_index < 2:  # the 1/16 Focus-Net stage needs the Base-Net stage 3 and the Overview-Net
            self.patch_embed3, self.patch_embed4, self.high_level_proj = nn.Identity(), nn.Identity(), nn.Identity()
            self.blocks3, self.blocks4, self.sub_blocks3 = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        if max_index < 1:
            self.patch_embed2, self.blocks2 = nn.Identity(), nn.ModuleList()
        if prune_head:  # no projection, pooling or classifier left: forward returns the last kept stage's map
            self.aux_head = None
            self.num_classes = 0
            self.head_hidden_size = self.num_features
            self.head.reset(0, "", reset_other=True, in_features=self.num_features, **get_device_dtype(self))
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_stages(x)[0][-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Logits; ``(logits, aux_logits)`` in train mode after ``set_aux_training(True)``."""
        outs, ctx = self._forward_stages(x)
        logits = self.forward_head(outs[-1])
        if self.aux_training and self.training and self.aux_head is not None:
            return logits, self.aux_head(ctx)
        return logits


# ---- checkpoint conversion -----------------------------------------------------------------------------------
_OFFICIAL_RULES = [
    (r"(se_layer|proj\.3)\.proj\.1\.", r"\1.fc1."),  # official SE: Sequential(pool, conv, GELU, conv, sigmoid)
    (r"(se_layer|proj\.3)\.proj\.3\.", r"\1.fc2."),
    (r"\.gamma$", ".weight"),  # GRN (the only gamma/beta parameters)
    (r"\.beta$", ".bias"),
    (r"^head\.0\.", "head.proj."),
    (r"^head\.1\.", "head.norm."),
    (r"^head\.4\.", "head.fc."),
    (r"^aux_head\.0\.", "aux_head.norm."),
    (r"^aux_head\.2\.", "aux_head.fc."),
]


def _unused(key: str, model: OverLoCK) -> bool:
    """Weights the model has no place for by construction: the training-only auxiliary head of a model built
    without it (``use_ds=False``), and classifiers of a model built with ``num_classes=0``."""
    if key.startswith("aux_head."):
        return model.aux_head is None or (key.startswith("aux_head.fc.") and isinstance(model.aux_head.fc, nn.Identity))
    return key.startswith("head.fc.") and isinstance(model.head.fc, nn.Identity)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: OverLoCK) -> Dict[str, torch.Tensor]:
    """Convert an official OverLoCK checkpoint (as published: flat or nested, EMA copies preferred, 'module.'
    prefixes) to this implementation's keys; already-converted checkpoints pass through.

    The auxiliary head is only used in training: its weights are dropped when the model was built without it
    (``use_ds=False``); classifier weights are dropped for ``num_classes=0``. A training-form checkpoint needs a training-form model (call ``reparameterize()`` after
    loading to get the deploy form) and a ``*_reparam`` checkpoint a deploy-form one.
    """
    out = {}
    for k, v in unwrap_checkpoint(state_dict).items():
        if k.endswith((".gamma", ".beta")):
            v = v.flatten()  # GRN (1, C, 1, 1) -> (C,)
        for pattern, repl in _OFFICIAL_RULES:
            k = re.sub(pattern, repl, k)
        if _unused(k, model):
            continue
        if k in ("head.fc.weight", "aux_head.fc.weight") and v.ndim == 4:
            v = v.flatten(1)  # 1x1-conv classifier -> Linear
        out[k] = v
    check_state_dict(out, model)
    return out


# ---- variants --------------------------------------------------------------------------------------------------
def _create_overlock(variant: str, pretrained: bool = False, **kwargs) -> OverLoCK:
    return build_model(
        OverLoCK, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_RELEASE = "https://github.com/LMMMEng/OverLoCK/releases/download/v1/"


def _cfg(file: str = "", **kwargs) -> Dict[str, Any]:
    # The authors evaluate with their validate.py (timm 0.6.12): resolve_data_config on the model's default_cfg,
    # i.e. 224x224, bicubic, center crop with the per-model crop_pct below, ImageNet mean/std, no test-time pool.
    return {
        "url": _RELEASE + file if file else "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.0", "classifier": ("head.fc", "aux_head.fc"),
        "license": "apache-2.0", "paper_ids": "arXiv:2502.20087",
        "paper_name": "OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels",
        "origin_url": "https://github.com/LMMMEng/OverLoCK",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # official ImageNet-1K top-1 in the comments; the re-parameterised files give the same accuracy (README)
    "overlock_xt.in1k": _cfg("overlock_xt_in1k_224.pth", crop_pct=0.925),  # 82.7
    "overlock_t.in1k": _cfg("overlock_t_in1k_224.pth", crop_pct=0.95),  # 84.2
    "overlock_s.in1k": _cfg("overlock_s_in1k_224.pth", crop_pct=0.95),  # 84.8
    "overlock_b.in1k": _cfg("overlock_b_in1k_224.pth", crop_pct=0.975),  # 85.1
    "overlock_xt_reparam.in1k": _cfg("overlock_xt_in1k_224_reparam.pth", crop_pct=0.925),  # 82.7
    "overlock_t_reparam.in1k": _cfg("overlock_t_in1k_224_reparam.pth", crop_pct=0.95),  # 84.2
    "overlock_s_reparam.in1k": _cfg("overlock_s_in1k_224_reparam.pth", crop_pct=0.95),  # 84.8
    "overlock_b_reparam.in1k": _cfg("overlock_b_in1k_224_reparam.pth", crop_pct=0.975),  # 85.1
})

_XT = dict(depth=(2, 2, 3, 2), sub_depth=(6, 2), embed_dim=(56, 112, 256, 336), sub_num_heads=(4, 6))
_T = dict(depth=(4, 4, 6, 2), sub_depth=(12, 2), embed_dim=(64, 128, 256, 512), sub_num_heads=(4, 8))
_S = dict(depth=(6, 6, 8, 3), sub_depth=(16, 3), embed_dim=(64, 128, 320, 512), sub_num_heads=(8, 16))
_B = dict(depth=(8, 8, 10, 4), sub_depth=(20, 4), embed_dim=(80, 160, 384, 576), sub_num_heads=(6, 9))
_COMMON = dict(kernel_size=(17, 15, 13, 7), mlp_ratio=(4, 4, 4, 4), sub_mlp_ratio=(3, 3))


def _variant(name: str, args: Dict[str, Any], pretrained: bool, kwargs: Dict[str, Any]) -> OverLoCK:
    deploy = dict(deploy=True) if name.endswith("_reparam") else {}
    return _create_overlock(name, pretrained, **{**_COMMON, **args, **deploy, **kwargs})


@register_model
def overlock_xt(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-XT (17.3M params with the auxiliary head)."""
    return _variant("overlock_xt", _XT, pretrained, kwargs)


@register_model
def overlock_t(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-T."""
    return _variant("overlock_t", _T, pretrained, kwargs)


@register_model
def overlock_s(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-S."""
    return _variant("overlock_s", _S, pretrained, kwargs)


@register_model
def overlock_b(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-B."""
    return _variant("overlock_b", _B, pretrained, kwargs)


@register_model
def overlock_xt_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-XT, re-parameterised (deploy) form."""
    return _variant("overlock_xt_reparam", _XT, pretrained, kwargs)


@register_model
def overlock_t_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-T, re-parameterised (deploy) form."""
    return _variant("overlock_t_reparam", _T, pretrained, kwargs)


@register_model
def overlock_s_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-S, re-parameterised (deploy) form."""
    return _variant("overlock_s_reparam", _S, pretrained, kwargs)


@register_model
def overlock_b_reparam(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-B, re-parameterised (deploy) form."""
    return _variant("overlock_b_reparam", _B, pretrained, kwargs)
