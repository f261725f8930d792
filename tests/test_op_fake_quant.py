"""ops/fake_quant.py: StatsQ and LSQ fake quantization, reference (hand-computed values, official STE gradients)
and Triton kernels (forward and backward vs the reference; TRITON_INTERPRET=1 on CPU, tiny shapes)."""
import pytest
import torch

from ops._dispatch import interpreting, triton_available
from ops.fake_quant import (lsq_fake_quant, lsq_fake_quant_reference, lsq_range, statsq_fake_quant,
                            statsq_fake_quant_reference, statsq_scale)

from lowp import assert_rounding

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (triton_available() and (torch.cuda.is_available() or interpreting())),
                                  reason="needs Triton on CUDA or TRITON_INTERPRET=1")


def test_lsq_range():
    assert lsq_range(2, True) == (-2, 1) and lsq_range(2, False) == (0, 3)
    assert lsq_range(4, True) == (-8, 7) and lsq_range(8, False) == (0, 255)
    with pytest.raises(ValueError):
        lsq_range(1, True)


@pytest.mark.parametrize("bits,expected", [
    (2, [0.15, -0.45, 0.45, -0.15]),     # k = round(c*2 - .5) = [0, -2, 1, -1] (-1.5 -> -2: half to even)
    (3, [0.075, -0.225, 0.525, -0.225]),  # k = [0, -2, 3, -2] (-2.5 -> -2), levels (k + .5) / 4
])
def test_statsq_hand_values_and_ste(bits, expected):
    w = torch.tensor([[0.1, -0.3, 0.6, -0.2], [1.0, 1.0, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    y = statsq_fake_quant_reference(w, bits)  # row 0: s = 2 * mean|w| = 0.6 ; w / s = [1/6, -1/2, 1, -1/3]
    torch.testing.assert_close(y[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    n = 2 ** (bits - 1)
    s1 = 2 * 1.5  # row 1: w / s = [1/3, 1/3, -1/3, 1] -> clipped to 1 - 1e-6 at the top level
    levels = torch.round(y[1] / s1 * n - 0.5)
    assert levels.max() == n - 1 and levels.min() >= -n
    assert set(((y[0] / 0.6 * n) - 0.5).round(decimals=6).tolist()) <= set(float(k) for k in range(-n, n))
    y.backward(torch.arange(8.0, dtype=torch.float64).view(2, 4))
    torch.testing.assert_close(w.grad, torch.arange(8.0, dtype=torch.float64).view(2, 4))  # identity STE
    torch.testing.assert_close(statsq_scale(w).flatten(), torch.tensor([0.6, 3.0], dtype=torch.float64))


def test_statsq_conv_weight_per_output_channel():
    w = torch.randn(4, 3, 3, 3)
    y = statsq_fake_quant_reference(w, 2)
    s = 2 * w.abs().flatten(1).mean(1)
    for c in range(4):
        assert set(torch.unique(torch.round(y[c] / s[c] * 4)).tolist()) <= {-3.0, -1.0, 1.0, 3.0}


def test_lsq_signed_hand_values_and_gradients():
    x = torch.tensor([-1.0, 0.26, 0.74, 3.0], requires_grad=True)
    step = torch.tensor([0.5], requires_grad=True)
    y = lsq_fake_quant_reference(x, step, 2, True, None, grad_scale=0.5)  # [Qn, Qp] = [-2, 1]
    torch.testing.assert_close(y, torch.tensor([-1.0, 0.5, 0.5, 0.5]))
    y.sum().backward()
    # v = [-2, .52, 1.48, 6]: only .52 is strictly inside (Qn, Qp); -2 sits on the boundary and counts as clipped
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # d/ds: inside round(v) - v = .48, clipped: Qn, Qp, Qp = -2, 1, 1; times grad_scale 0.5
    torch.testing.assert_close(step.grad, torch.tensor([0.5 * (-2.0 + 0.48 + 1.0 + 1.0)]))


def test_lsq_unsigned_per_channel_hand_values():
    x = torch.tensor([[-1.0, 0.26], [0.74, 3.0]], requires_grad=True)
    step = torch.tensor([0.5, 0.25], requires_grad=True)  # one step per column (dim=1)
    y = lsq_fake_quant_reference(x, step, 2, False, dim=1, grad_scale=1.0)  # [0, 3]
    # col 0: v = [-2, 1.48] -> [0, 1] * .5 ; col 1: v = [1.04, 12] -> [1, 3] * .25
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.25], [0.5, 0.75]]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(step.grad, torch.tensor([0.0 + (1 - 1.48), (1 - 1.04) + 3.0]))


def test_lsq_step_is_clipped_at_1e_5():
    x = torch.tensor([1e-5, 3e-5])
    y = lsq_fake_quant_reference(x, torch.tensor([0.0]), 4, True)
    torch.testing.assert_close(y, torch.tensor([1e-5, 3e-5]))


def test_dispatcher_checks_step_size():
    with pytest.raises(ValueError, match="step has 3 entries"):
        lsq_fake_quant(torch.randn(2, 4), torch.ones(3), 4, True, dim=1)


def _run_lsq(x, step, bits, signed, dim, gs, g, impl):
    x = x.detach().clone().requires_grad_()
    step = step.detach().clone().requires_grad_()
    y = lsq_fake_quant(x, step, bits, signed, dim, gs, impl=impl)
    y.backward(g)
    return y.detach(), x.grad, step.grad


@needs_triton
@pytest.mark.parametrize("shape,dim", [((2, 5, 3, 3), 1), ((3, 7, 6), -1), ((3, 7, 6), 1), ((37,), None),
                                        ((6, 10), 0), ((2, 3, 1, 5), 2)])
@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (8, True)])
def test_lsq_triton_matches_reference(shape, dim, bits, signed):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEV)
    c = 1 if dim is None else shape[dim]
    step = torch.rand(c, device=DEV) * 0.4 + 0.05
    g = torch.randn(shape, device=DEV)
    ref = _run_lsq(x, step, bits, signed, dim, 0.37, g, "reference")
    tri = _run_lsq(x, step, bits, signed, dim, 0.37, g, "triton")
    for a, b, what in zip(tri, ref, ("y", "dx", "dstep")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lsq_triton_half_dtypes(dtype):
    torch.manual_seed(1)
    x = torch.randn(4, 6, device=DEV).to(dtype)
    step = torch.full((6,), 0.3, device=DEV)
    g = torch.randn(4, 6, device=DEV).to(dtype)
    ref = _run_lsq(x.float(), step, 4, True, -1, 0.5, g.float(), "reference")  # fp32 on the same inputs
    tri = _run_lsq(x, step, 4, True, -1, 0.5, g, "triton")
    assert tri[0].dtype == dtype and tri[1].dtype == dtype and tri[2].dtype == torch.float32
    for a, b, what in zip(tri, ref, ("y", "dx", "dstep")):
        assert_rounding(a, b, dtype, what=what)


@needs_triton
@pytest.mark.parametrize("shape", [(5, 7), (3, 2, 3, 3), (4, 1, 5, 5)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_statsq_triton_matches_reference(shape, bits):
    torch.manual_seed(0)
    w = torch.randn(shape, device=DEV)
    g = torch.randn(shape, device=DEV)
    out = []
    for impl in ("reference", "triton"):
        ww = w.clone().requires_grad_()
        y = statsq_fake_quant(ww, bits, impl=impl)
        y.backward(g)
        out.append((y.detach(), ww.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=0)
    torch.testing.assert_close(out[1][1], g)


@needs_triton
def test_triton_ops_compile_as_custom_ops():
    assert hasattr(torch.ops.metamixer, "lsq_fake_quant") and hasattr(torch.ops.metamixer, "statsq_fake_quant")
    torch.library.opcheck(torch.ops.metamixer.statsq_fake_quant,
                          (torch.randn(3, 4, device=DEV), torch.rand(3, device=DEV) + 0.5, 2))
