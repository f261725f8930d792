"""lif_multistep: the Triton kernels against the reference, spikes and gradients, on awkward sizes and every mode.

On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
"""
import pytest
import torch

from ops._dispatch import triton_available
from ops.lif import lif_multistep, lif_multistep_reference

from lowp import assert_rounding, lowp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

MODES = [  # v_reset, detach_reset, decay_input
    (0.0, True, True),     # Spikformer's
    (0.0, False, True),
    (None, True, True),    # soft reset
    (None, False, False),
    (-0.25, False, True),  # hard reset to a non-zero potential (the reference's long formulas)
    (-0.25, True, False),
]
SHAPES = [(1, 7), (5, 3, 5), (16, 2, 3), (4, 1037)]  # T=1, odd counts, T=16, more than one 1024-neuron block


def _x(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 1.5 + 0.6).to(DEVICE)


def _check(shape, mode, tau=2.0, v_threshold=1.0, seed=0, x=None):
    v_reset, detach, decay = mode
    kw = dict(tau=tau, v_threshold=v_threshold, v_reset=v_reset, detach_reset=detach, decay_input=decay)
    x = (_x(shape, seed) if x is None else x).requires_grad_()
    ref = lif_multistep_reference(x, **kw)
    out = lif_multistep(x, impl="triton", **kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out, ref), f"{int((out != ref).sum())} spikes differ"
    g = torch.randn_like(ref)
    (gr,), (go,) = torch.autograd.grad(ref, x, g), torch.autograd.grad(out, x, g)
    torch.testing.assert_close(go, gr, rtol=1e-5, atol=1e-6)
    return out, go


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, mode):
    out, _ = _check(shape, mode, seed=len(shape) * 7 + shape[0])
    if out.numel() >= 30:
        assert 0 < out.mean() < 1  # the inputs make both spikes and silence


@pytest.mark.parametrize("mode", MODES[:3])
def test_threshold_ties_fire(mode):
    """Inputs on a grid of 1/8: with tau=2 every potential is exact, so many steps land exactly on the threshold;
    both paths must fire there (H(0) = 1)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 20, (6, 40), generator=g) / 8
    x[0, :3] = 2.0
    x = x.to(DEVICE)
    out, _ = _check(None, mode, x=x)
    ref = lif_multistep_reference(x, v_reset=mode[0], detach_reset=mode[1], decay_input=mode[2])
    assert torch.equal(out, ref)
    # the grid really produces ties: step 0 fires exactly at h = x/2 = 1
    assert (x[0] == 2.0).any() and (out[0][x[0] == 2.0] == 1).all()


def test_other_tau_and_threshold():
    # true division as in the reference; spikes equal unless the reference's own rounding differs (GPU reference
    # multiplies by the reciprocal), so allow a tiny fraction there
    x = _x((5, 301), 11)
    for tau, th, mode in ((3.0, 0.5, MODES[0]), (1.5, 0.7, MODES[2]), (4.0, 1.0, MODES[3])):
        kw = dict(tau=tau, v_threshold=th, v_reset=mode[0], detach_reset=mode[1], decay_input=mode[2])
        out, ref = lif_multistep(x, impl="triton", **kw), lif_multistep_reference(x, **kw)
        assert (out != ref).float().mean() <= (0.0 if DEVICE == "cpu" else 0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_fp32_state(dtype):
    """bf16/fp16 inputs: spikes equal the reference on the fp32-upcast input; gradients within one rounding step
    of its gradients."""
    (x,), (xf,) = lowp([_x((4, 3, 77), 5).requires_grad_()], dtype)
    out, ref = lif_multistep(x, impl="triton"), lif_multistep_reference(xf)
    assert out.dtype == dtype and torch.equal(out.float(), ref)
    g = torch.randn_like(ref).to(dtype)
    (gx,), (gf,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, xf, g.float())
    assert gx.dtype == dtype
    assert_rounding(gx, gf, dtype, what="grad of x")


def test_layouts():
    """Channels-last steps are read in place (the result keeps the layout); non-dense inputs are copied."""
    x = _x((3, 2, 5, 4, 6), 2)
    ref = lif_multistep_reference(x)
    cl = x.flatten(0, 1).to(memory_format=torch.channels_last).unflatten(0, (3, 2))
    out = lif_multistep(cl, impl="triton")
    assert out.stride() == cl.stride() and torch.equal(out, ref)
    t_inner = x.movedim(0, -1).contiguous().movedim(-1, 0)  # time is the fastest dimension
    assert torch.equal(lif_multistep(t_inner, impl="triton"), ref)
    expanded = x[:, :1].expand_as(x)
    assert torch.equal(lif_multistep(expanded, impl="triton"), lif_multistep_reference(expanded))


def test_dispatcher_and_compile():
    x = _x((3, 10), 4)
    with pytest.raises(ValueError, match="Triton kernel does not support"):
        lif_multistep(x.double(), impl="triton")  # float64 stays on the reference (parity fixtures)
    assert torch.equal(lif_multistep(x.double()), lif_multistep_reference(x.double()))
    torch.library.opcheck(torch.ops.metamixer.lif_multistep, (x, 2.0, 1.0, 0.0, True, True, 4.0))
    xs = x.clone().requires_grad_()
    f = torch.compile(lambda t: lif_multistep(t, impl="triton") * 2, backend="aot_eager", fullgraph=True)
    out = f(xs)
    out.sum().backward()
    xr = x.clone().requires_grad_()
    ref = lif_multistep_reference(xr) * 2
    ref.sum().backward()
    assert torch.equal(out, ref)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
