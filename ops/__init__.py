"""Token-mixer ops: a plain-PyTorch reference for each, Triton kernels behind one dispatcher per op.

See ``ops/_dispatch.py`` for how the implementation is chosen (``impl=`` argument or ``METAMIXER_OPS_IMPL``).
"""
from ._dispatch import ENV_VAR, resolve_impl, triton_available
from .dwconv import DWConv2d, dwconv2d, dwconv2d_reference
from .lka import lka, lka_reference
from .mix_shift import mix_shift, mix_shift_chunk_sizes, mix_shift_reference
from .channel_attention import channel_attention, channel_attention_reference
from .na2d import na2d_av, na2d_av_reference, na2d_qk, na2d_qk_reference, na2d_rpb
from .na2d_attention import na2d_attention, na2d_attention_reference
from .window_attention import window_attention, window_attention_reference
from .aggregated_attention import aggregated_attention, aggregated_attention_reference
from .lif import MultiStepLIF, lif_multistep, lif_multistep_reference
from .halo_attention import halo_attention, halo_attention_reference
from .spiking_attention import spiking_attention, spiking_attention_reference
from .fake_quant import lsq_fake_quant, lsq_fake_quant_reference, statsq_fake_quant, statsq_fake_quant_reference
