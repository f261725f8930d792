"""channel_attention (DaViT channel-group attention): the Triton kernels against the reference, values and
gradients, both versions (DaViT: softmax(k^T v) applied to q; Florence-2: softmax(q^T k / sqrt(N)) applied to v).

On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
"""
import pytest
import torch

from ops.channel_attention import channel_attention, channel_attention_reference
from ops._dispatch import triton_available

from lowp import assert_rounding, lowp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CASES = [  # B, N tokens, C, heads, version: token counts not multiples of the 64-token tile
    (2, 70, 96, 3, 1),
    (1, 130, 64, 2, 2),
    (2, 49, 48, 3, 1),
    (1, 9, 256, 2, 2),  # head_dim 128
    (1, 300, 64, 2, 1),  # more tokens than the fused kernels take: gram, softmax, apply kernels
]


@pytest.mark.parametrize("B,N,C,heads,version", CASES)
def test_triton_matches_reference(B, N, C, heads, version):
    torch.manual_seed(N + C + version)
    qkv = torch.randn(B, N, 3 * C, device=DEVICE, requires_grad=True)
    ref = channel_attention_reference(qkv, heads, version)
    out = channel_attention(qkv, heads, version, impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    got, want = (torch.autograd.grad(o, qkv, g)[0] for o in (out, ref))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_strided_qkv():
    """A qkv view with padded token stride equals the reference on the same view."""
    base = torch.randn(2, 40, 3 * 64 + 8, device=DEVICE)
    qkv = base[..., :3 * 64]
    ref = channel_attention_reference(qkv.double(), 2)
    torch.testing.assert_close(channel_attention(qkv, 2, impl="triton").double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("version", [1, 2])
def test_low_precision_accumulates_in_fp32(dt, version):
    """Output and gradient within one rounding step of the fp32 reference on the same low-precision qkv."""
    torch.manual_seed(0)
    base = torch.randn(2, 40, 3 * 64 + 8, device=DEVICE)
    (low,), (up,) = lowp([base], dt)
    qkv, qkv_f = low[..., :3 * 64].requires_grad_(), up[..., :3 * 64].requires_grad_()
    out, ref = channel_attention(qkv, 2, version, impl="triton"), channel_attention_reference(qkv_f, 2, version)
    assert out.dtype == dt
    assert_rounding(out, ref, dt, what="output")
    g = torch.randn_like(ref).to(dt)
    (got,), (want,) = torch.autograd.grad(out, qkv, g), torch.autograd.grad(ref, qkv_f, g.float())
    assert_rounding(got, want, dt, what="grad of qkv")


def test_unsupported_arguments_fall_back_or_refuse():
    qkv = torch.randn(1, 8, 3 * 30, device=DEVICE)  # head_dim 10: no kernel
    torch.testing.assert_close(channel_attention(qkv, 3), channel_attention_reference(qkv, 3))
    with pytest.raises(ValueError, match="does not support"):
        channel_attention(qkv, 3, impl="triton")
    with pytest.raises(ValueError, match="does not support"):
        channel_attention(torch.zeros(1, 8, 96, device=DEVICE, dtype=torch.float64), 1, impl="triton")


def test_custom_op_registration():
    """torch.library.opcheck: fake (meta) function, schema, autograd registration (needed by torch.compile)."""
    qkv = torch.randn(1, 20, 3 * 32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.metamixer.channel_attention, (qkv, 1, 1))
