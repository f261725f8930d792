"""Spikformer (V1) for timm: a spiking vision transformer of LIF neurons and softmax-free spiking self-attention.

Paper: "Spikformer: When Spiking Neural Network Meets Transformer" (Zhou et al., ICLR 2023),
https://arxiv.org/abs/2209.15425. Official code: https://github.com/ZK-Zhou/spikformer (imagenet/model.py,
cifar10/model.py, cifar10dvs/model.py at commit 6212689), MIT license. Reimplemented here without spikingjelly or
CuPy: every spiking neuron is ``ops.MultiStepLIF`` (``ops/lif.py`` defines the exact LIF recurrence), which is
stateless, so nothing has to be reset between batches.

Structure (all three official files): a Spiking Patch Splitting stem (SPS: 4 x [3x3 conv -> BN -> LIF (-> 3x3/2
max-pool)] with widths C/8, C/4, C/2, C, then ``x + LIF(BN(conv3x3(x)))`` as relative position embedding), ``depth``
blocks ``x = x + SSA(x); x = x + MLP(x)`` (no norms), and a linear head on the token- and time-averaged block output.
Every projection is conv/linear -> BN -> LIF, with time folded into the batch for conv and BN. Spiking
self-attention: q, k, v are spike maps, ``attn_lif((q @ k^T @ v) * scale)`` (threshold 0.5, no softmax) -> proj.

Forward and time steps: ``forward(x)`` takes a normal image batch ``(B, C, H, W)`` and repeats it over ``T`` time
steps (``T`` is a constructor argument), or a frame sequence ``(B, T, C, H, W)`` (event frames for the DVS models,
any ``T``). ``forward_features``/``forward_intermediates``/``features_only`` return time-averaged (firing-rate) maps
``(B, C, H, W)``; pass ``per_step=True`` to ``forward``/``forward_features`` for per-time-step outputs ``(T, B, ...)``
(per-step logits average to the normal logits: the head is affine). timm's FX feature extraction
(``features_only=True, feature_cls="fx"``) returns the blocks' outputs themselves, per time step ``(T, B, C, H, W)``:
their means over time are the default features.

Variants (the official code paths, one model class):
  * ImageNet (``spikformer_<depth>_<dim>``): stem pools at all 4 convs (stride 16), q/k/v without bias, SSA scale
    0.125. The official ``forward`` hard-codes T = 4; here T is an argument (default 4).
  * CIFAR (``spikformer_cifar_<depth>_<dim>``): stem pools only after its 3rd and 4th conv (stride 4); projections
    are ``nn.Linear`` (all with bias) + BatchNorm1d over channels in the official code, which are the same maps as
    our 1x1 conv + BatchNorm2d (weights are reshaped on load); scale 0.125; T = 4.
  * CIFAR10-DVS (``spikformer_dvs_<depth>_<dim>``): ImageNet-like stem, 2 input channels, SSA scale 0.25. Input: event
    frames ``(B, T, 2, 128, 128)`` (spikingjelly ``CIFAR10DVS(data_type='frame', frames_number=T,
    split_by='number')``: per-frame event counts of the two polarities, not normalised); official T = 16.

Differences from the official code, none of which changes the function computed by official weights:
  * Key layout: ``block`` -> ``blocks``; ``patch_embed.proj_conv{i}/proj_bn{i}`` -> ``patch_embed.convs.{i}.conv/bn``;
    ``rpe_conv/rpe_bn`` -> ``rpe.conv/bn``; ``{q,k,v,proj,fc1,fc2}_{conv,linear}/_bn`` -> ``{...}.conv/bn`` (1x1 Conv2d;
    Conv1d/Linear weights are reshaped). ``checkpoint_filter_fn`` converts.
  * Dropped on load because the official forward never uses them: ``Block.norm1/norm2`` (LayerNorms), and in the
    DVS model ``pos_embed`` and the final ``norm``. (``DropPath``, ``attn_drop`` and ``res_lif`` own no state.) So our
    parameter counts omit them: the official 8-512 model counts 29,705,768 parameters, 16,384 of them those
    LayerNorms; the paper's tables (16.81M ... 66.34M) count without them, as we do.
  * ``drop_path_rate`` works here (per sample, all time steps together); the official blocks build a DropPath but
    never apply it, so official training had no stochastic depth whatever ``drop_path_rate`` said.
  * Any input size works (max-pools round up); the official reshapes need H, W divisible by 16 (ImageNet),
    4 (CIFAR) or exactly 128 (DVS).
  * Attention is computed as ``q @ (k^T @ v)`` in every variant (the cheaper order); q, k, v are 0/1 spikes so both
    orders give exactly the same integers, and the power-of-two scale keeps them exact. It runs with its ``attn_lif``
    as one op, ``ops.spiking_attention`` (a fused Triton kernel on CUDA); the LIF is elementwise, so applying it
    before folding the heads back into channels changes nothing.

Multi-head split: channel ``c`` belongs to head ``c // (C / heads)``, as in the official reshape. Heads do not change
the parameter count; the official code fixes 8 heads for ImageNet (8-512) and 16 for CIFAR10-DVS (2-256), and
cifar10.yml uses 12 for 4-384. Assumed where the code gives none: 8 heads for every ImageNet variant (as the same
group's Spikingformer repo trains 8-768), 8 heads for CIFAR dim 256 (head dim 32, as 384/12).

Not implemented: Spikformer V2 ("Join the High Accuracy Club on ImageNet with an SNN Ticket", arXiv:2401.02020). Its
code was never released, and the paper's description of the Spiking Convolutional Stem (layer count, kernels,
strides, widths) and its variant table could not be retrieved here; the abstract only says the SCS adds
"supplementary convolutional layers" to the stem (V2-8-512: 80.38% at T=4; a 172M 16-layer model: 81.10% at T=1 after
masked-image pre-training). No V2 variant is registered rather than one with a guessed stem.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import drop_path, get_device_dtype, register_notrace_function, trunc_normal_
from timm.models import checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ops.lif import MultiStepLIF
from ops.spiking_attention import spiking_attention

from ._common import build_model, check_input, check_state_dict, unwrap_checkpoint

__all__ = ["Spikformer"]


class ConvBnLif(nn.Module):
    """``k x k`` conv -> BatchNorm2d -> multi-step LIF on a ``(T, B, C, H, W)`` sequence (time folded for conv/BN)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, bias: bool = True, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=bias, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.lif = MultiStepLIF(tau=2.0, detach_reset=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lif(self.bn(self.conv(x.flatten(0, 1))).unflatten(0, x.shape[:2]))


class SpikingPatchSplitting(nn.Module):
    """SPS stem: 4 conv-BN-LIF layers (widths C/8, C/4, C/2, C), each optionally followed by a 3x3/2 max-pool,
    then ``x + rpe(x)`` with ``rpe`` one more 3x3 conv-BN-LIF (the relative position embedding)."""

    def __init__(self, in_chans: int, embed_dim: int, downsample: Sequence[bool] = (True, True, True, True),
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if len(downsample) != 4:
            raise ValueError(f"downsample needs one flag per stem conv (4), got {downsample}")
        widths = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        self.convs = nn.ModuleList(
            ConvBnLif(c_in, c_out, 3, bias=False, **dd) for c_in, c_out in zip([in_chans] + widths[:-1], widths))
        self.downsample = tuple(downsample)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.rpe = ConvBnLif(embed_dim, embed_dim, 3, bias=False, **dd)
        self.reduction = 2 ** sum(self.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, down in zip(self.convs, self.downsample):
            x = conv(x)
            if down:
                x = self.pool(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return x + self.rpe(x)


class SpikingSelfAttention(nn.Module):
    """SSA: spike q, k, v (1x1 conv-BN-LIF); ``attn_lif((q @ k^T @ v) * scale)`` with threshold 0.5; proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, scale: float = 0.125, device=None,
                 dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = scale
        self.q = ConvBnLif(dim, dim, bias=qkv_bias, **dd)
        self.k = ConvBnLif(dim, dim, bias=qkv_bias, **dd)
        self.v = ConvBnLif(dim, dim, bias=qkv_bias, **dd)
        self.attn_lif = MultiStepLIF(tau=2.0, v_threshold=0.5, detach_reset=True)
        self.proj = ConvBnLif(dim, dim, bias=True, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (T, B, C, H, W) -> (T, B, heads, N, C // heads)
            return t.reshape(T, B, self.num_heads, C // self.num_heads, H * W).transpose(-1, -2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        lif = self.attn_lif  # attn_lif((q @ (k^T @ v)) * scale), one fused op (see ops/spiking_attention.py)
        x = spiking_attention(q, k, v, self.scale, lif.tau, lif.v_threshold, lif.v_reset, lif.detach_reset,
                              lif.decay_input, lif.alpha)
        return self.proj(x.transpose(-1, -2).reshape(T, B, C, H, W))


class SpikingMlp(nn.Module):
    """Two 1x1 conv-BN-LIF layers, ``dim -> hidden -> dim``."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.fc1 = ConvBnLif(dim, hidden_dim, bias=True, **dd)
        self.fc2 = ConvBnLif(hidden_dim, dim, bias=True, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class SequenceDropPath(nn.Module):
    """Stochastic depth on ``(T, B, ...)``: drops a sample's residual branch at all time steps together."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x.transpose(0, 1), self.drop_prob, self.training).transpose(0, 1)


class SpikformerBlock(nn.Module):
    """``x = x + SSA(x); x = x + MLP(x)`` (no normalisation layers)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, attn_scale: float,
                 drop_path: float = 0.0, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.attn = SpikingSelfAttention(dim, num_heads, qkv_bias, attn_scale, **dd)
        self.mlp = SpikingMlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path = SequenceDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


# A leaf for torch.fx (a public name: FX wraps no "_" names): it branches on the input's rank (image or frame
# sequence), which tracing does not know.
@register_notrace_function
def frames_to_sequence(x: torch.Tensor, in_chans: int, T: int) -> torch.Tensor:
    """``(B, C, H, W)`` image -> repeated ``(T, B, C, H, W)``; ``(B, T, C, H, W)`` frames -> ``(T, B, C, H, W)``."""
    if x.ndim == 5:
        check_input(x[:, 0], in_chans, name="Spikformer (frame sequence B, T, C, H, W)")
        return x.transpose(0, 1)
    if x.ndim != 4:
        raise ValueError("Spikformer expects an image batch (B, C, H, W) or a frame sequence (B, T, C, H, W), "
                         f"got a tensor of shape {tuple(x.shape)}")
    check_input(x, in_chans, name="Spikformer")
    return x.unsqueeze(0).expand(T, *x.shape)


@register_notrace_function
def mean_over_time(x: torch.Tensor, per_step: bool = False) -> torch.Tensor:
    """``(T, B, ...)`` -> ``(B, ...)``, or ``x`` itself with ``per_step``. A leaf for torch.fx: ``per_step`` is an
    argument of ``forward``, so a traced graph keeps both behaviours (tracing cannot branch on it)."""
    return x if per_step else x.mean(0)


class Spikformer(nn.Module):
    """Spikformer: SPS stem, ``depth`` spiking transformer blocks, linear head on time- and token-averaged features.

    Args:
        in_chans: input channels (3 for images, 2 for DVS event frames).
        num_classes: classifier outputs (0 for no classifier).
        embed_dim: token width C (divisible by 8).
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        T: time steps a static image is repeated over (a ``(B, T, C, H, W)`` input brings its own T).
        stem_downsample: which of the 4 stem convs are followed by a 3x3/2 max-pool.
        qkv_bias: bias in the q/k/v projections.
        attn_scale: constant that multiplies the attention output (0.125 or 0.25 officially; not head_dim**-0.5).
        linear_init: initialise the block projections like the CIFAR code's ``nn.Linear`` layers (trunc-normal,
            std 0.02, zero bias) instead of PyTorch's conv default.
        global_pool: 'avg' (token mean) or '' (no pooling, only with num_classes=0).
        drop_rate: dropout before the head. drop_path_rate: stochastic depth (see the module docstring).
        device, dtype: where and in which dtype the parameters are created (timm's factory keywords).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 512,
            depth: int = 8,
            num_heads: int = 8,
            mlp_ratio: float = 4.0,
            T: int = 4,
            stem_downsample: Sequence[bool] = (True, True, True, True),
            qkv_bias: bool = False,
            attn_scale: float = 0.125,
            linear_init: bool = False,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8 (the stem widths are C/8, C/4, C/2), got {embed_dim}")
        if T < 1:
            raise ValueError(f"T (time steps) must be >= 1, got {T}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.T = T
        self.num_features = self.head_hidden_size = embed_dim
        self.grad_checkpointing = False

        self.patch_embed = SpikingPatchSplitting(in_chans, embed_dim, stem_downsample, **dd)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            SpikformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, attn_scale, dpr[i], **dd)
            for i in range(depth)])
        r = self.patch_embed.reduction
        self.feature_info = [dict(num_chs=embed_dim, reduction=r, module=f"blocks.{i}") for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.global_pool = "avg"
        self.head = nn.Identity()
        self.reset_classifier(num_classes, global_pool)

        self.apply(self._init_linear)
        if linear_init:
            for m in self.blocks.modules():
                if isinstance(m, nn.Conv2d):
                    self._init_linear(m, force=True)

    @staticmethod
    def _init_linear(m: nn.Module, force: bool = False) -> None:
        if isinstance(m, nn.Linear) or force:
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- timm API ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("", "avg"):
                raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
            if num_classes > 0 and not global_pool:
                raise ValueError("global_pool='' (no pooling) only works without a classifier (num_classes=0)")
            self.global_pool = global_pool
        elif num_classes > 0 and not self.global_pool:
            self.global_pool = "avg"  # a classifier reads pooled features: back to the default pooling
        self.num_classes = num_classes
        # on the model's device and dtype, in its train/eval mode
        head = nn.Linear(self.num_features, num_classes, **get_device_dtype(self)) if num_classes > 0 else nn.Identity()
        self.head = head.train(self.training)

    def _to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return frames_to_sequence(x, self.in_chans, self.T)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Time-averaged block outputs ``(B, C, H', W')`` (firing rates) and the final time-averaged features.

        ``norm`` has no effect: Spikformer has no final norm.
        """
        if output_fmt != "NCHW":
            raise ValueError("Spikformer's intermediates are NCHW only")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.patch_embed(self._to_sequence(x))
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = checkpoint(blk, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x)
            if i in take_indices:
                intermediates.append(x.mean(0))
        if intermediates_only:
            return intermediates
        return x.mean(0), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor, per_step: bool = False) -> torch.Tensor:
        """Final block output averaged over time ``(B, C, H', W')``, or per time step ``(T, B, C, H', W')``."""
        x = self.patch_embed(self._to_sequence(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return mean_over_time(x, per_step)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token mean then head; works on ``(B, C, H, W)`` and on per-step ``(T, B, C, H, W)`` features."""
        if self.global_pool == "avg":
            x = x.mean((-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, per_step: bool = False) -> torch.Tensor:
        """Logits ``(B, classes)``; with ``per_step=True`` one set per time step ``(T, B, classes)``."""
        return self.forward_head(self.forward_features(x, per_step=per_step))


# ---- checkpoint conversion -----------------------------------------------------------------------------------
_OFFICIAL_RULES = [
    (r"^block\.", "blocks."),
    (r"^patch_embed\.proj_(conv|bn)(\d?)\.", lambda m: f"patch_embed.convs.{m.group(2) or 0}.{m.group(1)}."),
    (r"^patch_embed\.rpe_(conv|bn)\.", r"patch_embed.rpe.\1."),
    (r"\.(q|k|v|proj|fc1|fc2)_(?:conv|linear)\.", r".\1.conv."),
    (r"\.(q|k|v|proj|fc1|fc2)_bn\.", r".\1.bn."),
]
# State the official models own but never use in forward (see the module docstring).
_UNUSED = re.compile(r"^blocks\.\d+\.norm[12]\.|^pos_embed$|^norm\.")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: Spikformer) -> Dict[str, torch.Tensor]:
    """Convert an official Spikformer checkpoint (ImageNet, CIFAR or CIFAR10-DVS code; plain or nested under
    'state_dict'/'model'/EMA keys, with or without 'module.') to this layout; already-converted ones pass through."""
    out = {}
    for k, v in unwrap_checkpoint(state_dict).items():
        for pattern, repl in _OFFICIAL_RULES:
            k = re.sub(pattern, repl, k)
        if _UNUSED.search(k):
            continue
        if k.endswith(".conv.weight") and v.ndim < 4:  # Conv1d (out, in, 1) / Linear (out, in) -> 1x1 Conv2d
            v = v.reshape(v.shape[0], v.shape[1], 1, 1)
        out[k] = v
    check_state_dict(out, model)
    return out


# ---- variants --------------------------------------------------------------------------------------------------
def _create_spikformer(variant: str, pretrained: bool = False, **kwargs) -> Spikformer:
    # like timm's ViT: features_only defaults to the last 3 blocks (all blocks of shallower models)
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", 8)))
    return build_model(
        Spikformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    # The authors released no trained weights (ZK-Zhou/spikformer issues #11, #21, #27 ask for them, unanswered), so no
    # url. Eval preprocessing as the official test/train scripts evaluate (timm loaders driven by imagenet.yml /
    # cifar10.yml): ImageNet 224, crop_pct 1.0, bicubic, ImageNet mean/std; CIFAR-10 32, crop_pct 1.0, bicubic.
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
        "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.convs.0.conv", "classifier": "head",
        "license": "mit", "paper_ids": "arXiv:2209.15425",
        "paper_name": "Spikformer: When Spiking Neural Network Meets Transformer",
        "origin_url": "https://github.com/ZK-Zhou/spikformer",
        **kwargs,
    }


_CIFAR10 = dict(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8),
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
# CIFAR10-DVS: 128x128 frames of event counts, used as they come (no resize, no normalisation).
_DVS = dict(num_classes=10, input_size=(2, 128, 128), pool_size=(8, 8), mean=(0.0, 0.0), std=(1.0, 1.0),
            interpolation="nearest")

default_cfgs = generate_default_cfgs({
    # official top-1 (paper Tables; ImageNet and CIFAR at T=4, CIFAR10-DVS at T=16); no released weights
    "spikformer_8_384.in1k": _cfg(),  # 70.24
    "spikformer_6_512.in1k": _cfg(),  # 72.46
    "spikformer_8_512.in1k": _cfg(),  # 73.38
    "spikformer_10_512.in1k": _cfg(),  # 73.68
    "spikformer_8_768.in1k": _cfg(),  # 74.81
    "spikformer_cifar_4_256.cifar10": _cfg(**_CIFAR10),  # 93.94 (CIFAR-100: 75.96)
    "spikformer_cifar_2_384.cifar10": _cfg(**_CIFAR10),  # 94.80 (CIFAR-100: 76.95)
    "spikformer_cifar_4_384.cifar10": _cfg(**_CIFAR10),  # 95.19, 95.51 with 400 epochs (CIFAR-100: 77.86 / 78.21)
    "spikformer_dvs_2_256.cifar10dvs": _cfg(**_DVS),  # 80.9 (T=16), 78.9 (T=10)
})

_IMAGENET = dict(num_heads=8, T=4)
_CIFAR = dict(num_classes=10, stem_downsample=(False, False, True, True), qkv_bias=True, linear_init=True, T=4)
_DVS_ARGS = dict(in_chans=2, num_classes=10, attn_scale=0.25, T=16)


def _model(variant: str, pretrained: bool, args: Dict[str, Any], kwargs: Dict[str, Any]) -> Spikformer:
    return _create_spikformer(variant, pretrained, **dict(args, **kwargs))


@register_model
def spikformer_8_384(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-8-384, ImageNet (16.81M params)."""
    return _model("spikformer_8_384", pretrained, dict(_IMAGENET, depth=8, embed_dim=384), kwargs)


@register_model
def spikformer_6_512(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-6-512, ImageNet (23.37M params)."""
    return _model("spikformer_6_512", pretrained, dict(_IMAGENET, depth=6, embed_dim=512), kwargs)


@register_model
def spikformer_8_512(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-8-512, ImageNet (29.71M params; the official ``spikformer`` of imagenet/model.py)."""
    return _model("spikformer_8_512", pretrained, dict(_IMAGENET, depth=8, embed_dim=512), kwargs)


@register_model
def spikformer_10_512(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-10-512, ImageNet (36.01M params)."""
    return _model("spikformer_10_512", pretrained, dict(_IMAGENET, depth=10, embed_dim=512), kwargs)


@register_model
def spikformer_8_768(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-8-768, ImageNet (66.34M params)."""
    return _model("spikformer_8_768", pretrained, dict(_IMAGENET, depth=8, embed_dim=768), kwargs)


@register_model
def spikformer_cifar_4_256(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-4-256, CIFAR (cifar10/model.py structure; pass num_classes=100 for CIFAR-100)."""
    return _model("spikformer_cifar_4_256", pretrained, dict(_CIFAR, depth=4, embed_dim=256, num_heads=8), kwargs)


@register_model
def spikformer_cifar_2_384(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-2-384, CIFAR (cifar10/model.py structure; pass num_classes=100 for CIFAR-100)."""
    return _model("spikformer_cifar_2_384", pretrained, dict(_CIFAR, depth=2, embed_dim=384, num_heads=12), kwargs)


@register_model
def spikformer_cifar_4_384(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-4-384, CIFAR (cifar10.yml: 4 layers, dim 384, 12 heads, T=4)."""
    return _model("spikformer_cifar_4_384", pretrained, dict(_CIFAR, depth=4, embed_dim=384, num_heads=12), kwargs)


@register_model
def spikformer_dvs_2_256(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-2-256, CIFAR10-DVS (the official ``spikformer`` of cifar10dvs/model.py; input (B, T, 2, 128, 128))."""
    return _model("spikformer_dvs_2_256", pretrained, dict(_DVS_ARGS, depth=2, embed_dim=256, num_heads=16), kwargs)
