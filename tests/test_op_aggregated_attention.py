"""aggregated_attention: the fused Triton kernels against the reference, values and every gradient.

On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
Shapes are awkward on purpose: odd and non-square grids, a single row, grids split over several programs, one to
three heads, head widths that are not powers of two, and the pool sizes TransNeXt produces at small inputs
(1x1, 2x2, 3x2) and at 224 (7x7 = 49). q/k/v come as the model passes them: head-split views of (B, N, C) tensors.
"""
import importlib

import pytest
import torch

from ops._dispatch import triton_available
from ops.aggregated_attention import aggregated_attention, aggregated_attention_reference

from lowp import assert_rounding, lowp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
NAMES = ("q", "k", "v", "k_pool", "v_pool", "temperature", "query_embedding", "rpb_local", "pool_bias",
         "learnable_tokens", "learnable_bias")


def _inputs(B, nh, H, W, d, P, K=3, dtype=torch.float32, seed=0):
    """The op's 11 tensor arguments, parameters at a scale where every term matters (random, not the init)."""
    g = torch.Generator().manual_seed(seed)
    N, L = H * W, K * K

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    def heads(n):  # (B, n, nh*d) projections split into heads, as the model does: a strided view
        return r(B, n, nh * d).view(B, n, nh, d).transpose(1, 2)

    return [heads(N), heads(N), heads(N), heads(P), heads(P), r(nh, 1, 1), r(nh, 1, d, scale=0.3),
            r(nh, L, scale=0.3), r(nh, N, P, scale=0.3), r(nh, d, L, scale=0.3), r(nh, 1, L, scale=0.3)]


CASES = [  # B, heads, H, W, head dim, pooled tokens, window
    (1, 2, 5, 7, 6, 4, 3),     # odd, non-square; 2x2 pool (64x64 input, stage 1)
    (2, 1, 3, 4, 24, 1, 3),    # TransNeXt-Micro's head dim 24; 1x1 pool (32x32 input)
    (1, 3, 9, 8, 5, 49, 3),    # 72 pixels: two programs; 7x7 pool (224 input), padded to 64
    (2, 2, 1, 6, 3, 6, 3),     # a single row: every window is cut; 3x2 pool
    (1, 1, 7, 6, 4, 2, 5),     # a 5x5 window (any odd size works)
]


@pytest.mark.parametrize("B,nh,H,W,d,P,K", CASES)
def test_matches_reference(B, nh, H, W, d, P, K):
    args = [t.requires_grad_() for t in _inputs(B, nh, H, W, d, P, K, seed=H * 10 + W)]
    ref = aggregated_attention_reference(*args, (H, W), K)
    out = aggregated_attention(*args, (H, W), K, impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    for name, got, want in zip(NAMES, torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {name}: {m}")


def test_env_var_and_auto_dispatch(monkeypatch):
    args = _inputs(1, 2, 4, 5, 6, 4)
    ref = aggregated_attention_reference(*args, (4, 5))
    calls = []
    module = importlib.import_module("ops.aggregated_attention")  # (``ops.aggregated_attention`` is the function)
    monkeypatch.setattr(module._AggregatedAttentionFn, "apply", lambda *a: calls.append(1) or ref)
    aggregated_attention(*args, (4, 5))  # auto: the kernels on CUDA, the reference on CPU
    assert bool(calls) == args[0].is_cuda
    calls.clear()
    monkeypatch.setenv("METAMIXER_OPS_IMPL", "triton")
    aggregated_attention(*args, (4, 5))
    assert calls


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_fp32(dt):
    """Low-precision activations, fp32 parameters (as autocast passes them): output and every gradient within two
    rounding steps of the fp32 reference on the same low-precision activations. Two, not one: the pooled products
    run on tensor cores, so their operands (normalised q and pooled keys, the weights, dS) are rounded to the
    activation dtype before the fp32 accumulation (measured up to 1.3 steps: fp16 grad of k_pool)."""
    B, nh, H, W, d, P = 1, 2, 6, 5, 16, 4
    args = [t.requires_grad_() for t in _inputs(B, nh, H, W, d, P)]
    low, up = lowp(args[:5], dt)  # q, k, v, k_pool, v_pool
    out = aggregated_attention(*low, *args[5:], (H, W), impl="triton")
    ref = aggregated_attention_reference(*up, *args[5:], (H, W))
    assert out.dtype == dt
    assert_rounding(out, ref, dt, steps=2, what="output")
    g = torch.randn_like(ref).to(dt)
    for name, got, want in zip(NAMES, torch.autograd.grad(out, low + args[5:], g),
                               torch.autograd.grad(ref, up + args[5:], g.float())):
        assert_rounding(got, want, dt, steps=2, what=f"grad of {name}")


def test_autocast_casts_activations():
    args = _inputs(1, 2, 6, 5, 16, 4)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # as the model trains: fp32 tensors, autocast casts
        out = aggregated_attention(*args, (6, 5), impl="triton")
    low, up = lowp(args[:5], torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_rounding(out, aggregated_attention_reference(*up, *args[5:], (6, 5)), torch.bfloat16, steps=2)


def test_unsupported_arguments_stay_on_reference_or_raise():
    args = _inputs(1, 1, 4, 4, 4, 1, dtype=torch.float64)
    ref = aggregated_attention_reference(*args, (4, 4))
    torch.testing.assert_close(aggregated_attention(*args, (4, 4)), ref)
    with pytest.raises(ValueError, match="does not support"):  # float64: the reference only
        aggregated_attention(*args, (4, 4), impl="triton")
    args = _inputs(1, 1, 4, 4, 4, 1)
    with pytest.raises(ValueError, match="does not support"):  # attention dropout: the reference only
        aggregated_attention(*args, (4, 4), attn_drop=0.1, impl="triton")
    with pytest.raises(TypeError, match="dtypes differ"):
        aggregated_attention(args[0].half(), *args[1:], (4, 4), impl="triton")


def test_custom_op_registration():
    """torch.library.opcheck: fake (meta) functions, schema, autograd registration (the torch.compile path)."""
    args = [t.requires_grad_() for t in _inputs(1, 1, 3, 4, 4, 2)]
    torch.library.opcheck(torch.ops.metamixer.aggregated_attention.default, (*args, 3, 4, 3))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_uses_the_custom_op():
    """fullgraph: no graph break; forward and backward through metamixer::aggregated_attention."""
    args = [t.requires_grad_() for t in _inputs(1, 2, 5, 7, 6, 4)]
    compiled = torch.compile(lambda *a: aggregated_attention(*a, (5, 7), impl="triton"), backend="aot_eager",
                             fullgraph=True)
    out, ref = compiled(*args), aggregated_attention_reference(*args, (5, 7))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

def test_transnext_model_through_the_kernels(monkeypatch):
    """A small TransNeXt (aggregated attention in stages 1-3: 16x16, 8x8, 4x4 grids, 2x2 pools, head dims 4-8):
    logits and every parameter gradient through the kernels equal the reference path's (other ops: reference)."""
    import functools

    import backbones.transnext as transnext

    torch.manual_seed(0)
    model = transnext.TransNeXt(embed_dims=(8, 16, 24, 32), num_heads=(2, 2, 4, 4), depths=(1, 1, 1, 1),
                                num_classes=10, img_size=64).to(DEVICE)
    for p in model.parameters():  # randomise (the init leaves biases and tokens near zero)
        p.data.normal_(0, 0.2)
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    results = []
    for impl in ("reference", "triton"):
        monkeypatch.setattr(transnext, "aggregated_attention", functools.partial(aggregated_attention, impl=impl))
        logits = model(x)
        results.append((logits, torch.autograd.grad(logits.square().sum(), list(model.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for (name, _), got, want in zip(model.named_parameters(), results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=lambda m: f"grad of {name}: {m}")
