"""OFQ (oscillation-free quantization for low-bit vision transformers, Liu et al., ICML 2023; official code
nbasyl/OFQ) for every hub family: quantizers, the layer policy, CGA, the oscillation metric, QKR, the Lightning
callback (``callbacks=ofq``) and export of integer weights + scales.

Layer policy (``quantize_model``; include/exclude patterns configurable):
  * all families: stem / patch embedding (``pretrained_cfg['first_conv']``) and classifier at 8 bits (LSQ weights
    and inputs); every other ``nn.Conv2d`` (dense, 1x1, depthwise / large-kernel token mixers, downsampling) and
    ``nn.Linear`` at ``wbits`` (StatsQ weights, per output channel) with ``abits`` LSQ inputs between learnable
    shifts; norms, softmax, GELU/LIF and other non-linearities, residual adds and position-bias MLPs (``*cpb*``,
    ``*rpb*``) full precision; MLP ``fc2`` inputs unsigned (official), other input signs detected on the first
    batch;
  * attention families: outputs of q/k/v projections (``*qkv``, ``*.q``, ``*.k``, ``*.v``, ``*.kv``: DaViT,
    TransNeXt, HaloNet) quantized at ``abits``; attention probabilities (``attn_probs``) quantized at ``abits``
    (unsigned LSQ) by computing the attention explicitly (``backbones.quant.attention``) instead of the fused op:
    one step per query token where the token count is fixed (DaViT windows: per token; HaloNet: per query position
    of the block; DaViT channel attention: per query channel of the ``d x d`` map), one step per head where it
    depends on the resolution (TransNeXt full and aggregated attention, OverLoCK ContMix's two dynamic kernels);
    QKR (``qkr``, quantized ``W_q^T W_k`` per head) for DaViT's spatial attention and HaloNet (TransNeXt's cosine
    attention and OverLoCK have no plain q.k product); Spikformer's spiking attention has no softmax;
  * conv / MLP families (FFNet, VAN, OverLoCK, MS-MLP): the analogous policy above; layers whose weights a fused
    op reads without calling the layer (VAN's LKA, MS-MLP's mix-shift) get quantized weights and full-precision
    inputs (role ``weight_only``);
  * Spikformer: convs and linears as above; q/k/v are already binary spikes (no extra output quantizer).

DDP: LSQ initialisation averaged over ranks and its gradient scale counted over the global batch, so N processes
equal one process at the same global batch. ``torch.compile``: a quantized model compiles without graph breaks once
its LSQ steps are initialised (one eager forward, which the callback runs on the first batch); the initialisation
itself is eager-only.
"""
from .attention import (ContMixProbs, QKRAttention, QuantHaloAttention, QuantWindowAttention, attention_modules,
                        quantize_attention)
from .callback import OFQ
from .export import export_checkpoint, export_quantized, is_ofq_export, load_quantized, quantize_for_checkpoint
from .modules import QUANT_LAYERS, QuantConfig, QuantConv2d, QuantLinear, quantize_model, quantized_layers
from .oscillation import OscillationTracker, cga_free_mask
from .quantizers import LSQQuantizer, LearnableShift, StatsQ

__all__ = ["ContMixProbs", "OFQ", "QKRAttention", "QUANT_LAYERS", "QuantConfig", "QuantConv2d", "QuantHaloAttention",
           "QuantLinear", "QuantWindowAttention", "attention_modules", "cga_free_mask", "export_checkpoint", "export_quantized",
           "is_ofq_export", "load_quantized", "LSQQuantizer", "LearnableShift", "OscillationTracker",
           "quantize_attention", "quantize_for_checkpoint", "quantize_model", "quantized_layers", "StatsQ"]
