"""Quantized drop-ins for ``nn.Linear`` / ``nn.Conv2d`` and the layer policy that swaps them into any model.

A quantized layer keeps the original ``weight`` / ``bias`` parameters (same state_dict keys) and adds:
``wq`` (weight quantizer: StatsQ, or LSQ for 8-bit stem/head and the LSQ baseline), ``aq`` (LSQ on the input)
between the learnable shifts ``move_b4`` / ``move_aft`` (per input channel), and for q/k/v projections ``oq``
(LSQ on the output, i.e. the attention operands) between ``out_move_b4`` / ``out_move_aft``.
This is the official ``QLinear`` (``x -> move_b4 -> LSQ -> move_aft -> linear(x, StatsQ(W)) + b``).
``layer.weight`` is a property returning the quantized weight (the parameter is ``layer.raw_weight``), so fused
ops that read weights without calling the layer still compute with quantized weights; their *inputs* can only be
quantized when the layer's forward runs (the callback lists layers whose input quantizer never ran).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, asdict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops.dwconv import dwconv2d

from . import quantizers as _q
from .quantizers import LSQQuantizer, LearnableShift, StatsQ

__all__ = ["QuantConfig", "QuantLinear", "QuantConv2d", "quantize_model", "quantized_layers", "QUANT_LAYERS"]


@dataclass
class QuantConfig:
    """Which layers get which bits (see ``quantize_model``). Patterns are ``fnmatch`` patterns on module names."""
    wbits: int = 4
    abits: int = 4
    weight_quantizer: str = "statsq"        # 'statsq' (OFQ) | 'lsq' (the learnable-scale baseline)
    edge_bits: int = 8                      # stem / patch embedding and classifier (weights and inputs, LSQ)
    edge_layers: Optional[List[str]] = None  # None: the model's pretrained_cfg first_conv + classifier
    include: List[str] = field(default_factory=lambda: ["*"])
    exclude: List[str] = field(default_factory=lambda: ["*cpb*", "*rpb*", "*pos_embed*"])
    unsigned_inputs: List[str] = field(default_factory=lambda: ["*fc2"])   # official: MLP fc2 input unsigned
    qkv_outputs: List[str] = field(default_factory=lambda: ["*qkv", "*.q", "*.k", "*.v", "*.kv"])
    act_granularity: str = "channel"        # 'channel' (one step per input channel) | 'tensor'
    attn_probs: bool = True                 # quantize attention probabilities (backbones.quant.attention)
    qkr: bool = False                       # query-key reparameterisation (DaViT spatial attention, HaloNet)
    probe: bool = True                      # dry run: layers never called (fused ops) get no input quantizer

    def __post_init__(self):
        for b in (self.wbits, self.abits, self.edge_bits):
            if b not in (2, 3, 4, 8):
                raise ValueError(f"bits must be one of 2, 3, 4, 8, got {b}")
        if self.weight_quantizer not in ("statsq", "lsq"):
            raise ValueError(f"weight_quantizer must be 'statsq' or 'lsq', got {self.weight_quantizer!r}")
        if self.act_granularity not in ("channel", "tensor"):
            raise ValueError(f"act_granularity must be 'channel' or 'tensor', got {self.act_granularity!r}")

    def to_dict(self) -> Dict:
        return asdict(self)


class _QuantMixin:
    """Shared wiring of QuantLinear / QuantConv2d (``ch_dim``: the channel dim of inputs/outputs)."""
    ch_dim: int
    deployed: bool = False  # True: ``weight`` already holds de-quantized integer weights (``load_quantized``)

    def _init_quant(self, wq: nn.Module, in_ch: int, abits: int, signed: Optional[bool], per_channel: bool,
                    out_bits: Optional[int], out_ch: int, role: str):
        self.role = role
        self.wq = wq
        d = self.ch_dim if per_channel else None
        self.move_b4 = LearnableShift(in_ch, self.ch_dim)
        self.aq = LSQQuantizer(abits, in_ch if per_channel else 1, d, signed)
        self.move_aft = LearnableShift(in_ch, self.ch_dim)
        if out_bits:
            self.out_move_b4 = LearnableShift(out_ch, self.ch_dim)
            self.oq = LSQQuantizer(out_bits, out_ch if per_channel else 1, d, True)
            self.out_move_aft = LearnableShift(out_ch, self.ch_dim)
        else:
            self.oq = None

    @property
    def raw_weight(self) -> torch.Tensor:
        """The full-precision parameter (what the optimizer updates, state_dict key ``weight``)."""
        w = self._parameters.get("weight")
        if w is None:
            raise AttributeError("weight")
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The quantized weight (straight-through to ``raw_weight``). A property, so that models whose fused ops
        read ``layer.weight`` without calling the layer (e.g. VAN's LKA) also see quantized weights."""
        w = self.raw_weight
        return w if self.deployed else self.wq(w)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if _q.PROBE is not None:  # quantize_model's dry run: record the call
            _q.PROBE.add(id(self))
        if self.aq is None:
            return x
        return self.move_aft(self.aq(self.move_b4(x)))

    def drop_input_quant(self) -> None:
        """For layers whose forward never runs (a fused op reads their weight): no input quantizer, so that no
        parameter goes unused (DDP)."""
        self.move_b4 = self.aq = self.move_aft = None

    def quant_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.oq is None else self.out_move_aft(self.oq(self.out_move_b4(y)))


class QuantLinear(_QuantMixin, nn.Linear):
    ch_dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_output(F.linear(self.quant_input(x), self.weight, self.bias))


class QuantConv2d(_QuantMixin, nn.Conv2d):
    ch_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self.quant_input(x), self.weight
        if (self.groups == self.in_channels == self.out_channels and w.shape[1] == 1
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            y = dwconv2d(x, w, self.bias, self.stride, self.padding, self.dilation)
        else:
            y = self._conv_forward(x, w, self.bias)
        return self.quant_output(y)


QUANT_LAYERS = (QuantLinear, QuantConv2d)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _edge_layers(model: nn.Module, cfg: QuantConfig) -> List[str]:
    if cfg.edge_layers is not None:
        return list(cfg.edge_layers)
    pc = getattr(model, "pretrained_cfg", None) or {}
    names = []
    for key in ("first_conv", "classifier"):
        v = pc.get(key)
        names += [v] if isinstance(v, str) else list(v or [])
    return names


def _swap(m: nn.Module, cls) -> nn.Module:
    """A ``cls`` instance sharing ``m``'s parameters and conv/linear attributes."""
    q = cls.__new__(cls)
    nn.Module.__init__(q)
    for k, v in vars(m).items():
        if k not in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                     "_backward_hooks", "training"):
            setattr(q, k, v)
    q.training = m.training
    for k, p in m._parameters.items():
        q.register_parameter(k, p)
    return q


def quantize_model(model: nn.Module, cfg: QuantConfig | Dict) -> Dict[str, str]:
    """Replace, in place, every ``nn.Linear`` / ``nn.Conv2d`` (including depthwise and ``DWConv2d``) whose name
    matches ``include`` and not ``exclude`` by its quantized drop-in. Returns ``{name: role}``.

    Policy (the official DeiT/Swin policy, generalised by module type and name):
      * ``edge`` layers (stem / patch embedding and classifier: the model's ``pretrained_cfg`` ``first_conv`` and
        ``classifier`` unless ``edge_layers`` is given): LSQ weights per output channel and LSQ inputs at
        ``edge_bits`` (8); stem input one step per channel (sign detected), classifier input one step;
      * every other conv / linear (block convs incl. depthwise token mixers, MLPs, projections, downsampling):
        ``weight_quantizer`` (StatsQ) weights at ``wbits``, LSQ inputs at ``abits`` between learnable shifts;
        input sign detected on the first batch, unsigned for ``unsigned_inputs`` (official: MLP ``fc2``);
      * q/k/v projections (``qkv_outputs``): their outputs (the attention operands) LSQ-quantized at ``abits``;
      * attention probabilities (``attn_probs``: DaViT spatial and channel, HaloNet, TransNeXt full and aggregated
        attention, OverLoCK ContMix) and QKR (``qkr``: DaViT spatial attention, HaloNet) through
        ``backbones.quant.attention`` (roles ``attention`` / ``attention_qkr``);
      * norms, softmax, GELU and other non-linearities, residual adds, position biases stay full precision.
    A dry run (``probe``) finds layers whose forward never runs because a fused op reads their weights (VAN's
    LKA, MS-MLP's mix-shift): their weights are quantized (``layer.weight`` is quantized) but they get no input
    quantizer (role ``weight_only``), so no parameter stays unused under DDP.
    Modules that already are quantized are left alone (idempotent).
    """
    from .attention import attention_modules, qkr_owned as _qkr_owned, quantize_attention

    cfg = cfg if isinstance(cfg, QuantConfig) else QuantConfig(**cfg)
    edges = set(_edge_layers(model, cfg))
    roles: Dict[str, str] = {}
    attn = attention_modules(model, cfg.attn_probs, cfg.qkr)
    qkr_owned = set(_qkr_owned(model, attn)) if cfg.qkr else set()  # QKR quantizes q/k/v itself
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, QUANT_LAYERS)
               and _matches(n, cfg.include) and not _matches(n, cfg.exclude) and n not in qkr_owned]
    for name, m in targets:
        is_conv = isinstance(m, nn.Conv2d)
        in_ch = m.in_channels if is_conv else m.in_features
        out_ch = m.out_channels if is_conv else m.out_features
        cls = QuantConv2d if is_conv else QuantLinear
        q = _swap(m, cls)
        if name in edges:
            role = "edge"
            wq = LSQQuantizer(cfg.edge_bits, out_ch, 0, True)
            per_channel = is_conv  # official: image input per channel, classifier input per tensor
            q._init_quant(wq, in_ch, cfg.edge_bits, None if per_channel else True, per_channel, None, out_ch, role)
        else:
            role = "block"
            wq = StatsQ(cfg.wbits) if cfg.weight_quantizer == "statsq" else LSQQuantizer(cfg.wbits, out_ch, 0, True)
            signed = False if _matches(name, cfg.unsigned_inputs) else None
            out_bits = cfg.abits if _matches(name, cfg.qkv_outputs) else None
            q._init_quant(wq, in_ch, cfg.abits, signed, cfg.act_granularity == "channel", out_bits, out_ch, role)
        q.to(m.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        roles[name] = role
    roles.update(quantize_attention(model, attn, cfg.abits, cfg.wbits, cfg.qkr, cfg.attn_probs))
    if roles and cfg.probe:
        for n in _uncalled_layers(model, [n for n, r in roles.items() if r in ("edge", "block")]):
            model.get_submodule(n).drop_input_quant()
            roles[n] = "weight_only"
    if not roles and not quantized_layers(model):
        raise ValueError("quantize_model: no nn.Linear / nn.Conv2d matched include/exclude")
    return roles


def _uncalled_layers(model: nn.Module, names: List[str]) -> List[str]:
    """Quantized layers whose forward does not run in a forward pass of the model (one image at its
    ``pretrained_cfg`` input size, eval mode, no quantization): fused ops read their weights directly."""
    pc = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(pc.get("input_size") or (3, 224, 224))
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first_conv.in_channels if first_conv is not None else size[0]
    p = next(model.parameters())
    was_training = model.training
    _q.PROBE = set()
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *size[1:], device=p.device, dtype=p.dtype))
        called = _q.PROBE
    except Exception:  # a model the probe input does not fit: keep every input quantizer
        called = None
    finally:
        _q.PROBE = None
        model.train(was_training)
    if called is None:
        return []
    return [n for n in names if id(model.get_submodule(n)) not in called]


def quantized_layers(model: nn.Module):
    """``(name, module)`` of every quantized layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
