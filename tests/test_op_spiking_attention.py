"""spiking_attention: the fused Triton kernel (q @ (k^T @ v) * scale -> LIF) against the reference, spikes and
gradients, on awkward sizes, head layouts and LIF modes.

On CPU the kernel runs through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
"""
import pytest
import torch

from ops._dispatch import triton_available
from ops.spiking_attention import spiking_attention, spiking_attention_reference

from lowp import assert_rounding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _heads(T, B, H, N, d, seed, channels_last=False, p=0.3, dtype=torch.float32):
    """(T, B, H, N, d) head views of a (T, B, C, h, w) spike map, as Spikformer's attention makes them."""
    g = torch.Generator().manual_seed(seed)
    w = 1 if N % 2 else 2
    m = (torch.rand(T * B, H * d, N // w, w, generator=g) < p).to(device=DEVICE, dtype=dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m.unflatten(0, (T, B)).reshape(T, B, H, d, N).transpose(-1, -2)


CASES = [  # T, B, heads, N, d, scale, spike probability, channels_last
    (1, 1, 1, 5, 3, 0.5, 0.7, False),     # T=1, tiny
    (5, 2, 3, 17, 8, 0.125, 0.3, True),   # T=5, odd N, channels-last source
    (4, 1, 2, 70, 20, 0.25, 0.1, False),  # two token blocks, d not a power of two
    (2, 1, 1, 9, 80, 0.125, 0.2, True),   # d > 64
    (16, 1, 2, 6, 4, 0.25, 0.5, False),   # T=16
]
LIF_MODES = [dict(), dict(v_reset=None), dict(detach_reset=False), dict(v_reset=None, detach_reset=False,
                                                                          decay_input=False)]


@pytest.mark.parametrize("lif", LIF_MODES)
@pytest.mark.parametrize("T,B,H,N,d,scale,p,cl", CASES)
def test_fused_kernel_matches_reference(T, B, H, N, d, scale, p, cl, lif):
    """The fused kernel (fp16 here): spikes exactly the fp32 reference's; gradients within two fp16 rounding steps
    of the fp32 reference's: the backward rounds dL/dx and d(k^T v) to fp16 for its matmuls (measured up to
    1.05 steps for dk)."""
    q, k, v = (_heads(T, B, H, N, d, seed=i + N, channels_last=cl, p=p, dtype=torch.float16).requires_grad_()
               for i in range(3))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = spiking_attention_reference(qf, kf, vf, scale, **lif)
    assert 0 < ref.mean() < 1  # the inputs make both spikes and silence
    out = spiking_attention(q, k, v, scale, impl="triton", **lif)
    assert out.dtype == torch.float16 and out.shape == ref.shape
    assert torch.equal(out.float(), ref), f"{int((out.float() != ref).sum())} spikes differ"
    # the result folds back into (T, B, C, N) without a copy
    assert out.transpose(-1, -2).reshape(T, B, H * d, N).data_ptr() == out.data_ptr()
    g = torch.randn(ref.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(N)).half()
    grads = torch.autograd.grad(out, (q, k, v), g)
    for name, got, want in zip("qkv", grads, torch.autograd.grad(ref, (qf, kf, vf), g.float())):
        assert_rounding(got, want, torch.float16, steps=2, what=f"grad of {name}")


@pytest.mark.parametrize("lif", LIF_MODES[:2])
def test_fp32_path_matches_reference(lif):
    """fp32 takes matmuls + the Triton LIF: spikes equal, gradients to fp32 rounding."""
    q, k, v = (_heads(5, 2, 3, 17, 8, seed=i, channels_last=True).requires_grad_() for i in range(3))
    ref = spiking_attention_reference(q, k, v, 0.125, **lif)
    out = spiking_attention(q, k, v, 0.125, impl="triton", **lif)
    assert torch.equal(out, ref) and 0 < ref.mean() < 1
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_exact(dtype):
    """bf16/fp16 spikes: counts accumulate in fp32 in the kernel, so the spikes equal the fp32 reference."""
    q, k, v = (_heads(3, 2, 2, 33, 12, seed=i + 7, dtype=dtype) for i in range(3))
    out = spiking_attention(q, k, v, 0.125, impl="triton")
    assert out.dtype == dtype
    assert torch.equal(out.float(), spiking_attention_reference(q.float(), k.float(), v.float(), 0.125))


def test_autocast_and_dispatcher():
    q, k, v = (_heads(2, 1, 2, 10, 8, seed=i) for i in range(3))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = spiking_attention(q, k, v, 0.125, impl="triton")
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), spiking_attention_reference(q, k, v, 0.125))
    with pytest.raises(ValueError, match="Triton kernel does not support"):
        spiking_attention(q.double(), k.double(), v.double(), 0.125, impl="triton")
    qd, kd, vd = q.double(), k.double(), v.double()
    assert torch.equal(spiking_attention(qd, kd, vd, 0.125), spiking_attention_reference(qd, kd, vd, 0.125))
    qh, kh, vh = q.half(), k.half(), v.half()
    torch.library.opcheck(torch.ops.metamixer.spiking_attention, (qh, kh, vh, 0.125, 2.0, 0.5, 0.0, True, True, 4.0))


def test_spikformer_triton_path_matches_reference(monkeypatch):
    """A tiny Spikformer through the Triton LIF and attention kernels gives the reference's logits and gradients."""
    import timm

    import backbones.spikformer  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model("spikformer_8_384", embed_dim=32, depth=1, num_heads=2, T=3, num_classes=5).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    results = []
    for impl in ("reference", "triton"):
        monkeypatch.setenv("METAMIXER_OPS_IMPL", impl)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref, ref_grads), (tri, tri_grads) = results
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(tri_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
