"""TransNeXt for timm.

Paper: "TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (Dai Shi, CVPR 2024),
https://arxiv.org/abs/2311.17132. Official code: https://github.com/DaiShiResearch/TransNeXt
(classification/transnext.py + attention_native.py), Apache-2.0.

A PVTv2-style pyramid: overlapping patch embeds, then blocks of ``x + attn(norm1(x))``, ``x + ConvGLU(norm2(x))``.
Stages with ``sr_ratio > 1`` use aggregated attention (``ops.aggregated_attention``: a 3x3 sliding window plus
pooled tokens in one softmax); ``sr_ratio == 1`` stages use full cosine attention. Both take a continuous relative
position bias from a small MLP (``cpb_fc1/cpb_fc2``) evaluated on a log-spaced table of query-to-key offsets.

Resolution. The official model fixes its resolution at construction (``img_size``) and cannot run any other size.
Here everything resolution-dependent (per-stage query grid, pooled grid, window masks, length scales, the cpb
offset table and index) is computed from the actual input at forward time (the cpb tables cached per size), so one
model runs any size:
  * ``pretrain_size`` (default ``img_size``) is the only construction-time resolution: offsets are divided by
    ``pretrain_size // stride - 1`` exactly as the official code, so an official ``TransNeXt(img_size=S,
    pretrain_size=P)`` equals ours with ``pretrain_size=P`` run at ``S x S`` (its "multi-scale inference").
  * ``fixed_pool_size`` fixes the pooled grid of the aggregated stages (the official "linear inference mode").
  * the pooled grid is otherwise ``grid // sr_ratio`` per axis; a size whose grid is smaller than that (or not larger
    than ``fixed_pool_size``) is rejected with a clear error. Non-square inputs work too.

Key layout vs the official code (as in timm's pvt_v2): ``patch_embed1`` -> ``patch_embed``, ``patch_embed{i}`` ->
``stages.{i-1}.downsample``, ``block{i}.{j}`` -> ``stages.{i-1}.blocks.{j}``, ``norm{i}`` -> ``stages.{i-1}.norm``,
``mlp.dwconv.dwconv`` -> ``mlp.dwconv``. The official ``drop_rate`` (dropout after projections) is ``proj_drop_rate``
here; ``drop_rate`` is the timm head dropout (all three are 0 in the official configs).
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, get_device_dtype, register_notrace_module, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_model_deprecations
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ops import DWConv2d
from ops.aggregated_attention import aggregated_attention, aggregated_attention_reference

from ._common import build_model, check_input, check_state_dict, ofq_attention, stage_intermediates, unwrap_checkpoint

__all__ = ["TransNeXt"]

Size = Tuple[int, int]


# ---- continuous relative position bias ---------------------------------------------------------------------------
@torch.no_grad()
def relative_position_cpb(query_size: Size, key_size: Size, pretrain_grid: Size) -> Tuple[torch.Tensor, torch.Tensor]:
    """Offsets between every query pixel and every (pooled) key, as the official ``get_relative_position_cpb``.

    Query coordinates are ``arange(H)``; key coordinates are the adaptive-average-pooled query coordinates (bin means).
    Offsets are scaled by ``8 / (pretrain_grid - 1)``, deduplicated (``torch.unique``, sorted) and mapped by
    ``sign(x) * log2(|x| + 1) / 3``. All in float32, like the official buffers.
    Returns ``(index (Nq*Nk,), table (T, 2))``.
    """
    axes = []
    for q_len, k_len, p_len in zip(query_size, key_size, pretrain_grid):
        axis_q = torch.arange(q_len, dtype=torch.float32)
        axis_k = F.adaptive_avg_pool1d(axis_q[None], k_len)[0]
        axes.append((axis_q, axis_k, p_len))
    (qh, kh, ph), (qw, kw, pw) = axes
    qh, qw = (t.reshape(-1) for t in torch.meshgrid(qh, qw, indexing="ij"))
    kh, kw = (t.reshape(-1) for t in torch.meshgrid(kh, kw, indexing="ij"))
    rel_h = (qh[:, None] - kh[None, :]) / (ph - 1) * 8
    rel_w = (qw[:, None] - kw[None, :]) / (pw - 1) * 8
    table, index = torch.unique(torch.stack([rel_h, rel_w], dim=-1).view(-1, 2), return_inverse=True, dim=0)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / torch.log2(torch.tensor(8, dtype=torch.float32))
    return index, table


def cpb_bias(fc1: nn.Linear, fc2: nn.Linear, index: torch.Tensor, table: torch.Tensor, num_q: int, num_k: int):
    """Per-head bias ``(heads, num_q, num_k)``: the cpb MLP on the offset table, gathered by ``index``."""
    bias = fc2(F.relu(fc1(table.to(fc1.weight.dtype))))  # (T, heads)
    return bias.transpose(0, 1)[:, index].view(-1, num_q, num_k)


# ---- blocks ---------------------------------------------------------------------------------------------------------
class ConvolutionalGLU(nn.Module):
    """fc1 -> split (x, gate); x -> 3x3 depthwise conv -> GELU; x * gate -> fc2. ``hidden = int(2 * hidden / 3)``."""

    def __init__(self, dim: int, hidden_features: int, drop: float = 0.0, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        hidden = int(2 * hidden_features / 3)
        self.fc1 = nn.Linear(dim, hidden * 2, **dd)
        self.dwconv = DWConv2d(hidden, 3, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x, v = self.fc1(x).chunk(2, dim=-1)
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, *size)).flatten(2).transpose(1, 2)
        x = self.drop(self.act(x) * v)
        return self.drop(self.fc2(x))


class _CosineAttentionBase(nn.Module):
    """Parameters shared by both attention types: temperature, query embedding, output projection, cpb MLP.
    ``probs_quant`` (set by OFQ, one step per head) quantizes the softmax weights; the fused ops have no hook for
    them, so the attention is computed explicitly while it is set."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # softplus(temperature) starts at 1/0.24
        self.temperature = nn.Parameter(torch.log((torch.ones(num_heads, 1, 1, **dd) / 0.24).exp() - 1))
        self.query_embedding = nn.Parameter(trunc_normal_(torch.empty(num_heads, 1, self.head_dim, **dd), std=0.02))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512, **dd)
        self.cpb_fc2 = nn.Linear(512, num_heads, **dd)
        self.probs_quant = None


@ofq_attention("transnext_full")
class Attention(_CosineAttentionBase):
    """Full attention (``sr_ratio == 1`` stages): scaled cosine similarity, ``log(N)`` length scale, cpb bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__(dim, num_heads, attn_drop, proj_drop, device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, size: Size, pool_size: Size, index: torch.Tensor,
                table: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3 * self.num_heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        bias = cpb_bias(self.cpb_fc1, self.cpb_fc2, index, table, N, N)
        q = (F.normalize(q, dim=-1) + self.query_embedding) * F.softplus(self.temperature) * math.log(N)
        k = F.normalize(k, dim=-1)
        if self.probs_quant is None:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                               dropout_p=self.attn_drop if self.training else 0.0, scale=1.0)
        else:
            probs = self.probs_quant((q @ k.transpose(-2, -1) + bias.to(q.dtype)).softmax(dim=-1))
            x = F.dropout(probs, self.attn_drop, self.training) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


@ofq_attention("transnext_aggregated")
class AggregatedAttention(_CosineAttentionBase):
    """Pixel-focused attention: 3x3 window keys + pooled keys in one softmax (``ops.aggregated_attention``).

    Pooled tokens: 1x1 conv ``sr`` -> GELU -> adaptive average pool to ``pool_size`` -> LayerNorm (eps 1e-5, the
    nn.LayerNorm default, not the model's 1e-6) -> the same ``kv`` projection as the local keys/values.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 3, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, num_heads, attn_drop, proj_drop, **dd)
        if window_size % 2 != 1:
            raise ValueError(f"window_size must be odd, got {window_size}")
        self.window_size = window_size
        local_len = window_size ** 2
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        self.act = nn.GELU()
        self.relative_pos_bias_local = nn.Parameter(
            trunc_normal_(torch.empty(num_heads, local_len, **dd), std=0.0004))
        self.learnable_tokens = nn.Parameter(
            trunc_normal_(torch.empty(num_heads, self.head_dim, local_len, **dd), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, local_len, **dd))

    def project(self, x: torch.Tensor, size: Size, pool_size: Size):
        """``(q, k, v, k_pool, v_pool)``, each ``(B, heads, tokens, head_dim)``: the local projections of ``x`` and
        those of its pooled tokens."""
        B, N, C = x.shape
        nh, hd = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, nh, hd).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2 * nh, hd).transpose(1, 2).chunk(2, dim=1)
        pooled = self.act(self.sr(x.transpose(1, 2).reshape(B, C, *size)))
        pooled = self.norm(F.adaptive_avg_pool2d(pooled, pool_size).flatten(2).transpose(1, 2))
        P = pooled.shape[1]
        k_pool, v_pool = self.kv(pooled).reshape(B, P, 2 * nh, hd).transpose(1, 2).chunk(2, dim=1)
        return q, k, v, k_pool, v_pool

    def forward(self, x: torch.Tensor, size: Size, pool_size: Size, index: torch.Tensor,
                table: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v, k_pool, v_pool = self.project(x, size, pool_size)
        P = k_pool.shape[2]
        args = (q, k, v, k_pool, v_pool, self.temperature, self.query_embedding, self.relative_pos_bias_local,
                cpb_bias(self.cpb_fc1, self.cpb_fc2, index, table, N, P), self.learnable_tokens, self.learnable_bias,
                size, self.window_size, self.attn_drop if self.training else 0.0)
        if self.probs_quant is None:
            x = aggregated_attention(*args)
        else:
            x = aggregated_attention_reference(*args, probs_fn=self.probs_quant)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int = 3, mlp_ratio: float = 4.0, sr_ratio: int = 1,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        if sr_ratio == 1:
            self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, **dd)
        else:
            self.attn = AggregatedAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = ConvolutionalGLU(dim, int(dim * mlp_ratio), proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: Size, pool_size: Size, index: torch.Tensor,
                table: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size, pool_size, index, table))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class OverlapPatchEmbed(nn.Module):
    """Conv (kernel ``patch_size``, padding ``patch_size // 2``) -> LayerNorm (eps 1e-5); NCHW in, NHWC out."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, patch_size // 2, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


# A leaf module for torch.fx: the tables depend on the input's size, which tracing does not know (and a traced graph
# keeps the cache).
@register_notrace_module
class CpbTables(nn.Module):
    """A stage's :func:`relative_position_cpb` ``(index, table)`` for a query/key grid size, built on first use for
    each size (and device) and cached (no parameters or buffers: nothing in the state_dict)."""

    def __init__(self, pretrain_grid: Size):
        super().__init__()
        self.pretrain_grid = pretrain_grid
        self.cache: Dict[Tuple[int, int, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, size: Size, pool_size: Size, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (*size, device)
        if key not in self.cache:
            if len(self.cache) >= 8:  # bound the cache under multi-scale training
                self.cache.clear()
            index, table = relative_position_cpb(size, pool_size, self.pretrain_grid)
            self.cache[key] = index.to(device), table.to(device)
        return self.cache[key]


class TransNeXtStage(nn.Module):
    """(downsample) -> blocks on tokens -> norm; NHWC (first stage) or NCHW in, NCHW out.

    Holds the resolution-dependent cpb tables, built on first use for each input size (and device) and cached.
    """

    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool, num_heads: int, window_size: int,
                 sr_ratio: int, mlp_ratio: float, qkv_bias: bool, proj_drop: float, attn_drop: float,
                 drop_path: Sequence[float], norm_layer: Callable, pretrain_grid: int,
                 fixed_pool_size: Optional[int], device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.sr_ratio = sr_ratio
        self.fixed_pool_size = fixed_pool_size if sr_ratio > 1 else None
        self.pretrain_grid = to_2tuple(pretrain_grid)
        self.downsample = OverlapPatchEmbed(3, 2, dim, dim_out, **dd) if downsample else None
        self.blocks = nn.ModuleList([
            Block(dim_out, num_heads, window_size, mlp_ratio, sr_ratio, qkv_bias, proj_drop, attn_drop,
                  drop_path[j], norm_layer, **dd)
            for j in range(depth)])
        self.norm = norm_layer(dim_out, **dd)
        self.cpb_tables = CpbTables(self.pretrain_grid)

    def min_grid(self) -> int:
        """Smallest query grid side this stage accepts."""
        if self.sr_ratio == 1:
            return 1
        return self.sr_ratio if self.fixed_pool_size is None else self.fixed_pool_size + 1

    def pool_size(self, size: Size) -> Size:
        if self.sr_ratio == 1:
            return size
        if self.fixed_pool_size is not None:
            return self.fixed_pool_size, self.fixed_pool_size
        return size[0] // self.sr_ratio, size[1] // self.sr_ratio

    def tables(self, size: Size, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cpb_tables(size, self.pool_size(size), device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        B, H, W, C = x.shape
        size = (H, W)  # at least min_grid() per side: the model checks the input size
        index, table = self.tables(size, x.device)
        args = (size, self.pool_size(size), index, table)
        x = x.reshape(B, H * W, C)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, *args)
            else:
                x = blk(x, *args)
        return self.norm(x).reshape(B, H, W, C).permute(0, 3, 1, 2)


# ---- model ----------------------------------------------------------------------------------------------------------
class TransNeXt(nn.Module):
    """TransNeXt. ``img_size`` / ``pretrain_size`` / ``fixed_pool_size`` as in the official constructor (see the
    module docstring: any input size works at forward time; ``pretrain_size`` defaults to ``img_size``).
    ``device`` / ``dtype``: where and in which dtype the parameters are created (timm's factory keywords)."""

    def __init__(
            self,
            img_size: int = 224,
            pretrain_size: Optional[int] = None,
            fixed_pool_size: Optional[int] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            patch_size: int = 4,
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (3, 4, 6, 3),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            window_size: Sequence[Optional[int]] = (3, 3, 3, None),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        num_stages = len(depths)
        pretrain_size = pretrain_size or img_size
        if pretrain_size // (patch_size * 2 ** (num_stages - 1)) < 2:
            raise ValueError(f"pretrain_size {pretrain_size} leaves a last-stage grid below 2 (cpb offsets divide by "
                             f"grid - 1): use at least {2 * patch_size * 2 ** (num_stages - 1)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.pretrain_size = pretrain_size
        self.grad_checkpointing = False

        self.patch_embed = OverlapPatchEmbed(2 * patch_size - 1, patch_size, in_chans, embed_dims[0], **dd)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info, cur = [], [], 0
        for i in range(num_stages):
            stride = patch_size * 2 ** i
            stages.append(TransNeXtStage(
                embed_dims[i - 1] if i else embed_dims[0], embed_dims[i], depths[i], downsample=i > 0,
                num_heads=num_heads[i], window_size=window_size[i], sr_ratio=sr_ratios[i], mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[cur:cur + depths[i]], norm_layer=norm_layer, pretrain_grid=pretrain_size // stride,
                fixed_pool_size=fixed_pool_size, **dd))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        # grid side of stage i for an input side s is ceil(s / stride_i): smallest input meeting every stage's need
        self.min_input_size = max((s.min_grid() - 1) * f["reduction"] + 1 for s, f in zip(stages, self.feature_info))

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official init; the attention parameters keep the values set in their constructors
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- timm API ------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        # the official training excludes these from weight decay by keyword
        return {"query_embedding", "relative_pos_bias_local", "cpb", "temperature"}

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        keywords = self.no_weight_decay_keywords()
        return {n for n, _ in self.named_parameters() if any(k in n for k in keywords)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            if num_classes > 0 and not global_pool:
                raise ValueError("global_pool='' (no pooling) only works without a classifier (num_classes=0)")
            self.global_pool = global_pool
        elif num_classes > 0 and not self.global_pool:
            self.global_pool = "avg"  # a classifier reads pooled features: back to the default pooling
        self.num_classes = num_classes
        # on the model's device and dtype, in its train/eval mode
        head = nn.Linear(self.num_features, num_classes, **get_device_dtype(self)) if num_classes > 0 else nn.Identity()
        self.head = head.train(self.training)

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_chans, min_size=self.min_input_size, name="TransNeXt")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (each after its stage norm, NCHW) and the final features. ``norm`` is a no-op: every
        stage ends with its own norm."""
        if output_fmt != "NCHW":
            raise ValueError("TransNeXt's intermediates are NCHW only")
        self._check_input(x)
        x = self.patch_embed(x)
        return stage_intermediates(x, self.stages, indices, norm, stop_early, intermediates_only)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True  # the head is sized for the last stage
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- checkpoint conversion ------------------------------------------------------------------------------------------
_OFFICIAL_RULES = [
    (r"^patch_embed1\.", "patch_embed."),
    (r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample."),
    (r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"^norm(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
]
# The official geometry buffers (computed from img_size; non-persistent, so absent from the published files, but
# present in exports that saved every buffer). Ours are computed per input size, so they are dropped.
_GEOMETRY = re.compile(r"(^relative_pos_index\d+|^relative_coords_table\d+|\.seq_length_scale|\.padding_mask)$")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: TransNeXt) -> Dict[str, torch.Tensor]:
    """Convert an official TransNeXt checkpoint (as published: ``{'model': state_dict, 'optimizer': ...}``)."""
    sd = unwrap_checkpoint(state_dict)
    out = {}
    for k, v in sd.items():
        if _GEOMETRY.search(k):
            continue
        for pattern, repl in _OFFICIAL_RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    check_state_dict(out, model)
    return out


# ---- variants -------------------------------------------------------------------------------------------------------
def _create_transnext(variant: str, pretrained: bool = False, **kwargs) -> TransNeXt:
    return build_model(
        TransNeXt, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(hf_repo: str = "", **kwargs) -> Dict[str, Any]:
    # Official eval (classification/datasets.py build_transform): below 384, Resize(int(size / 0.875), bicubic) +
    # CenterCrop(size); at 384 a bicubic warp to 384x384 (no crop). ImageNet mean/std.
    return {
        "hf_hub_id": f"DaiShiResearch/{hf_repo}" if hf_repo else None,
        "hf_hub_filename": f"{hf_repo.replace('-', '_')}.pth" if hf_repo else None,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2311.17132",
        "paper_name": "TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
        "origin_url": "https://github.com/DaiShiResearch/TransNeXt",
        **kwargs,
    }


# 384 fine-tunes: evaluated with --input-size 384 --pretrain-size 224 (the registered models' default pretrain_size)
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode="squash")

default_cfgs = generate_default_cfgs({
    # official top-1 (ImageNet-1K val) in the comments
    "transnext_micro.in1k": _cfg("transnext-micro-224-1k"),  # 82.5
    "transnext_tiny.in1k": _cfg("transnext-tiny-224-1k"),  # 84.0
    "transnext_small.in1k": _cfg("transnext-small-224-1k"),  # 84.7
    "transnext_small.in1k_384": _cfg("transnext-small-384-1k-ft-1k", **_384),  # 86.0
    "transnext_base.in1k": _cfg("transnext-base-224-1k"),  # 84.8
    "transnext_base.in1k_384": _cfg("transnext-base-384-1k-ft-1k", **_384),  # 86.2
    # trained at 256 (pretrain_size 256): Resize(292) + CenterCrop(256)
    "transnext_micro_aaaa.in1k": _cfg("transnext-micro-AAAA-256-1k", input_size=(3, 256, 256),
                                      pool_size=(8, 8)),  # 82.6
})


def _variant(embed_dims, num_heads, depths, **kwargs) -> Dict[str, Any]:
    return dict(embed_dims=embed_dims, num_heads=num_heads, depths=depths, mlp_ratios=(8, 8, 4, 4), qkv_bias=True,
                window_size=(3, 3, 3, None), sr_ratios=(8, 4, 2, 1), **kwargs)


@register_model
def transnext_micro(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Micro (12.8M params)."""
    args = _variant((48, 96, 192, 384), (2, 4, 8, 16), (2, 2, 15, 2))
    return _create_transnext("transnext_micro", pretrained, **dict(args, **kwargs))


@register_model
def transnext_tiny(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Tiny (28.2M params)."""
    args = _variant((72, 144, 288, 576), (3, 6, 12, 24), (2, 2, 15, 2))
    return _create_transnext("transnext_tiny", pretrained, **dict(args, **kwargs))


@register_model
def transnext_small(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Small (49.7M params)."""
    args = _variant((72, 144, 288, 576), (3, 6, 12, 24), (5, 5, 22, 5))
    return _create_transnext("transnext_small", pretrained, **dict(args, **kwargs))


@register_model
def transnext_base(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Base (89.7M params)."""
    args = _variant((96, 192, 384, 768), (4, 8, 16, 32), (5, 5, 23, 5))
    return _create_transnext("transnext_base", pretrained, **dict(args, **kwargs))


@register_model
def transnext_micro_aaaa(pretrained: bool = False, **kwargs) -> TransNeXt:
    """TransNeXt-Micro with aggregated attention in all four stages (official ``transnext_micro_AAAA``, 13.1M),
    trained at 256x256 (so ``pretrain_size`` 256)."""
    args = _variant((48, 96, 192, 384), (2, 4, 8, 16), (2, 2, 15, 2), img_size=256)
    args.update(window_size=(3, 3, 3, 3), sr_ratios=(16, 8, 4, 2))
    return _create_transnext("transnext_micro_aaaa", pretrained, **dict(args, **kwargs))


register_model_deprecations(__name__, {"transnext_micro_AAAA": "transnext_micro_aaaa.in1k"})  # the official name
