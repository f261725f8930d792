"""lka (VAN's Large Kernel Attention): the Triton path against the reference, values and gradients.

On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
"""
import pytest
import torch

from ops.lka import lka, lka_reference
from ops._dispatch import triton_available

from lowp import assert_rounding, lowp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cudnn.allow_tf32 = False  # the reference must be true fp32 on GPU
torch.backends.cuda.matmul.allow_tf32 = False
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _params(C, bias, dtype=torch.float32):
    def r(*shape, scale=1.0):
        return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale
    return [r(C, 1, 5, 5, scale=0.2), r(C) if bias else None, r(C, 1, 7, 7, scale=0.15), r(C) if bias else None,
            r(C, C, 1, 1, scale=C ** -0.5), r(C) if bias else None]


@pytest.mark.parametrize("B,C,H,W,cl,bias", [
    (1, 5, 7, 9, False, True),     # map smaller than the dilated 7x7's reach
    (2, 20, 11, 6, True, False),   # channels-last, no biases, C not a power of two
    (2, 3, 12, 13, True, True),
    (1, 33, 5, 4, False, True),    # C above the GEMM's K tile
])
def test_triton_matches_reference(B, C, H, W, cl, bias):
    torch.manual_seed(B * 100 + C * 10 + H)
    x = torch.randn(B, C, H, W, device=DEVICE)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    ps = _params(C, bias)
    leaves = [t.requires_grad_() for t in [x] + [p for p in ps if p is not None]]
    ref = lka_reference(x, *ps)
    out = lka(x, *ps, impl="triton")
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_accumulates_in_fp32():
    """bf16 output and gradients against the fp32 reference on the same bf16 inputs, within two rounding steps:
    the op rounds the attention map to bf16 before the gate, as the reference's chain does on bf16 tensors
    (measured up to 1.04 steps: grad of w1)."""
    torch.manual_seed(1)
    x = torch.randn(1, 24, 9, 10, device=DEVICE).to(memory_format=torch.channels_last)
    low, up = lowp([t.requires_grad_() for t in [x, *_params(24, True)]], torch.bfloat16)
    ref, out = lka_reference(*up), lka(*low, impl="triton")
    assert out.dtype == torch.bfloat16
    assert_rounding(out, ref, torch.bfloat16, steps=2, what="output")
    g = torch.randn_like(ref).bfloat16()
    for name, got, want in zip(("x", "w5", "b5", "w7", "b7", "w1", "b1"), torch.autograd.grad(out, low, g),
                               torch.autograd.grad(ref, up, g.float())):
        assert got.dtype == torch.bfloat16
        assert_rounding(got, want, torch.bfloat16, steps=2, what=f"grad of {name}")


def test_autocast_matches_reference_dtypes():
    torch.manual_seed(2)
    x = torch.randn(1, 16, 8, 8, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    ps = [p.requires_grad_() for p in _params(16, True)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref, out = lka_reference(x, *ps), lka(x, *ps, impl="triton")
    assert out.dtype == ref.dtype == torch.float32  # fp32 x times a bf16 attention map
    assert_rounding(out, ref, torch.bfloat16, steps=2)
    grads = torch.autograd.grad(out.sum(), [x] + ps)
    assert all(g.dtype == torch.float32 for g in grads)


def test_dispatch_fp64_and_dtype_checks():
    x = torch.randn(1, 4, 6, 6, device=DEVICE, dtype=torch.float64)
    ps = _params(4, True, torch.float64)
    assert torch.equal(lka(x, *ps), lka_reference(x, *ps))  # auto: float64 always takes the reference
    with pytest.raises(ValueError, match="does not support"):
        lka(x, *ps, impl="triton")
    with pytest.raises(ValueError, match="w7 must have shape"):
        lka(x.float(), ps[0].float(), None, ps[0].float(), None, ps[4].float(), None, impl="triton")


@pytest.mark.skipif(DEVICE == "cpu", reason="model-sized shapes: GPU only (too slow for the interpreter)")
@pytest.mark.parametrize("C,H", [(32, 56), (160, 14), (256, 7)])
@pytest.mark.parametrize("cl", [True, False])
def test_van_shapes_on_gpu(C, H, cl):
    torch.manual_seed(C)
    x = torch.randn(2, C, H, H, device=DEVICE)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    ps = _params(C, True)
    leaves = [t.requires_grad_() for t in [x] + ps]
    ref, out = lka_reference(x, *ps), lka(x, *ps, impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-4)


def test_torch_compile():
    """The op traces as an opaque custom op (no graph break); on CPU without inductor (no C++ build in CI)."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    x = torch.randn(2, 16, 9, 9, device=DEVICE, requires_grad=True)
    ps = _params(16, True)
    fn = torch.compile(lambda t: lka(t, *ps, impl="triton").square().sum(), fullgraph=True,
                       backend=backend)
    (got,) = torch.autograd.grad(fn(x), x)
    (want,) = torch.autograd.grad(lka_reference(x, *ps).square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auto_on_cuda_composes_the_dispatched_dwconvs(monkeypatch):
    """auto on a CUDA tensor runs the reference's structure with the dwconv2d dispatcher (simulated here on CPU)."""
    import sys

    from ops import lka, lka_reference
    lka_mod = sys.modules["ops.lka"]  # (the package attribute ops.lka is the function)

    calls = []

    def fake_resolve(impl, x, supported=True, preferred=True):
        calls.append(preferred)
        return "triton" if preferred else "reference"  # what auto answers for a CUDA tensor
    monkeypatch.setattr(lka_mod, "resolve_impl", fake_resolve)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, 9, generator=g)
    ws = [torch.randn(6, 1, 5, 5, generator=g), torch.randn(6, generator=g), torch.randn(6, 1, 7, 7, generator=g),
          torch.randn(6, generator=g), torch.randn(6, 6, 1, 1, generator=g), torch.randn(6, generator=g)]
    torch.testing.assert_close(lka(x, *ws), lka_reference(x, *ws))
    assert calls == [False, True]  # the fused gate path was declined, the composed path taken
