"""na2d_attention (fused neighbourhood attention): the Triton kernels against the composed reference ops, values and
gradients (q, k, v, rpb), on awkward sizes. On CPU through TRITON_INTERPRET=1 (tests/conftest.py)."""
import pytest
import torch

from ops._dispatch import triton_available
from ops.na2d_attention import na2d_attention, na2d_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CASES = [  # B, heads, H, W, D, Dv, kernel, rpb, scale
    (1, 2, 9, 7, 5, 5, 5, True, 0.7),     # odd map, head dim 5 (padded), windows shifted at both borders
    (2, 1, 6, 11, 16, 8, 3, False, 1.0),  # Dv != D; a tile row of 8 and a partial one
    (1, 1, 14, 14, 8, 8, 13, True, 1.0),  # OverLoCK-like: 13x13 windows on a 14x14 map (nearly dense)
    (1, 3, 5, 5, 4, 4, 5, True, 0.5),     # window = the whole map
    (2, 1, 3, 2, 3, 3, 1, True, 1.0),     # 1x1 window on a tiny map (the key box padded to tl.dot's minimum)
]


@pytest.mark.parametrize("B,G,H,W,D,DV,ks,use_rpb,scale", CASES)
def test_fused_matches_reference(B, G, H, W, D, DV, ks, use_rpb, scale):
    torch.manual_seed(H * 10 + W + ks)
    q, k = (torch.randn(B, G, H, W, D, device=DEVICE) for _ in range(2))
    v = torch.randn(B, G, H, W, DV, device=DEVICE)
    rpb = torch.randn(G, 2 * ks - 1, 2 * ks - 1, device=DEVICE) if use_rpb else None
    leaves = [t.requires_grad_() for t in (q, k, v) + ((rpb,) if use_rpb else ())]
    ref = na2d_attention_reference(q, k, v, ks, rpb, scale)
    out = na2d_attention(q, k, v, ks, rpb, scale, impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_strided_inputs_and_errors():
    base = torch.randn(2, 7, 6, 3, 8, device=DEVICE)  # [B, H, W, (q, k, v), D]: q, k, v are strided views
    q, k, v = (base[..., i, :].unsqueeze(1) for i in range(3))
    torch.testing.assert_close(na2d_attention(q, k, v, 5, impl="triton"), na2d_attention_reference(q, k, v, 5),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_size"):
        na2d_attention(q, k, v, 7, impl="triton")  # 7 > W = 6: the window does not fit the map
    with pytest.raises(ValueError, match="rpb"):
        na2d_attention(q, k, v, 5, torch.zeros(1, 3, 3, device=DEVICE), impl="triton")


def test_custom_op_registration():
    """torch.library.opcheck: schema, fake function and autograd registration (what torch.compile uses)."""
    q, k, v = (torch.randn(1, 2, 6, 5, 4, device=DEVICE, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.metamixer.na2d_attention, (q, k, v, rpb, 3, 0.5))
