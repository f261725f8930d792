"""halo_attention: the Triton kernels against the reference (HaloNet / timm HaloAttn semantics), values and
gradients.

On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
Shapes are awkward on purpose: batch 1-2, odd head counts, block 2-4, halo 0-3 (halo >= block included), strided
queries, q/k and v head dims that differ and are not powers of two, maps of one block in a direction, and k/v as
non-contiguous views into one tensor (as HaloNet passes them).
"""
import pytest
import torch

from ops._dispatch import triton_available
from ops.halo_attention import halo_attention, halo_attention_reference

from lowp import assert_rounding, lowp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CASES = [  # B, heads, dqk, dv, nbh, nbw (blocks per side), block, halo, stride
    (1, 1, 4, 4, 2, 3, 4, 1, 1),
    (2, 3, 3, 5, 2, 2, 2, 2, 1),   # halo == block: windows reach two blocks away
    (1, 2, 3, 4, 2, 3, 2, 3, 1),   # halo > block: every window covers the whole 4 x 6 map and more
    (1, 3, 5, 3, 1, 2, 3, 1, 1),   # odd block, one block row
    (2, 1, 6, 7, 2, 2, 4, 2, 2),   # strided queries (2x2 query tiles)
    (1, 3, 4, 2, 3, 1, 2, 1, 2),   # strided queries, one query per block
    (1, 1, 2, 3, 2, 2, 3, 0, 1),   # no halo
    (1, 1, 3, 70, 1, 2, 2, 1, 1),  # value head > 64: two value-channel chunks, the second partial
    (1, 1, 3, 130, 1, 1, 8, 1, 1),  # block 8 (64 keys), value head 130: the key-stationary backward splits dv in 2
]


def _inputs(B, G, dqk, dv, nbh, nbw, block, halo, stride, dtype=torch.float32):
    H, W, win = nbh * block, nbw * block, block + 2 * halo
    kv = torch.randn(B, G, dqk + dv, H, W, device=DEVICE, dtype=dtype)
    q = torch.randn(B, G, dqk, H // stride, W // stride, device=DEVICE, dtype=dtype)
    rel = torch.randn(2, 2 * win - 1, dqk, device=DEVICE, dtype=dtype) * dqk ** -0.5
    return q, kv, rel


@pytest.mark.parametrize("B,G,dqk,dv,nbh,nbw,block,halo,stride", CASES)
def test_matches_reference(B, G, dqk, dv, nbh, nbw, block, halo, stride):
    torch.manual_seed(block * 100 + halo * 10 + dqk)
    q, kv, rel = (t.requires_grad_() for t in _inputs(B, G, dqk, dv, nbh, nbw, block, halo, stride))
    outs = []
    for impl in ("reference", "triton"):
        k, v = kv.split([dqk, dv], 2)  # non-contiguous views
        outs.append(halo_attention(q, k, v, rel[0], rel[1], block, halo, stride, scale=0.7, impl=impl))
    ref, out = outs
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)  # the kernel reads any grad strides
    for got, want in zip(torch.autograd.grad(out, (q, kv, rel), g), torch.autograd.grad(ref, (q, kv, rel), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_query_chunks():
    """Programs owning a chunk of a block's queries (the ``q_chunk`` tuning knob) give the same values and grads."""
    from ops.halo_attention import _launch_bwd, _launch_fwd
    q, kv, rel = _inputs(1, 3, 5, 3, 2, 1, 8, 1, 1)
    k, v = kv.split([5, 3], 2)
    (out, lse), (out16, lse16) = (_launch_fwd(q, k, v, rel[0], rel[1], 8, 1, 1, 0.5, c) for c in (None, 16))
    torch.testing.assert_close(out16, out, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    grads = [_launch_bwd(g, q, k, v, rel[0], rel[1], out, lse, 8, 1, 1, 0.5, c) for c in (None, 16)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_zero_halo_takes_part_in_the_softmax():
    """Keys outside the map are zeros with logit = relative logit, not masked out: with v = 1 inside the map, every
    output is the probability mass inside the map, which is < 1 (it would be exactly 1 if the halo were masked)."""
    q, kv, rel = _inputs(1, 1, 3, 3, 1, 1, 2, 2, 1)
    k, v = kv[:, :, :3], torch.ones_like(kv[:, :, 3:])
    out = halo_attention(q, k, v, rel[0], rel[1], 2, 2, impl="triton")
    torch.testing.assert_close(out, halo_attention_reference(q, k, v, rel[0], rel[1], 2, 2), rtol=1e-5, atol=1e-5)
    assert out.max() < 0.99


# Triton 3.9's interpreter multiplies the raw bit patterns in tl.dot of bf16 operands (triton-lang/triton#11584,
# "not supported yet"; fp16 is exact), so bf16 runs on a GPU only.
LOW_PRECISION = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="the Triton interpreter's tl.dot is wrong for bf16 operands"))]


@pytest.mark.parametrize("dt", LOW_PRECISION)
def test_low_precision_accumulates_in_fp32(dt):
    """Output within one rounding step of the fp32 reference on the same low-precision inputs, gradients within
    two: the backward rounds the logit gradients to the input dtype for its tensor-core products (then sums them
    over a window row or column for the relative tables, where they largely cancel; with halo >= block the table
    gradient reaches ~3 steps in fp16, 1.75 for q)."""
    (q, kv, rel), (qf, kvf, relf) = lowp([t.requires_grad_() for t in _inputs(2, 3, 6, 5, 2, 2, 4, 2, 2)], dt)
    k, v = kv.split([6, 5], 2)
    kf, vf = kvf.split([6, 5], 2)
    ref = halo_attention_reference(qf, kf, vf, relf[0], relf[1], 4, 2, 2)
    out = halo_attention(q, k, v, rel[0], rel[1], 4, 2, 2, impl="triton")
    assert out.dtype == dt
    assert_rounding(out, ref, dt, what="output")
    g = torch.randn_like(ref).to(dt)
    for name, got, want in zip(("q", "kv", "rel"), torch.autograd.grad(out, (q, kv, rel), g),
                               torch.autograd.grad(ref, (qf, kvf, relf), g.float())):
        assert_rounding(got, want, dt, steps=2, what=f"grad of {name}")


def test_autocast_casts_operands():
    """Under autocast the fp32 parameters (relative tables) meet low-precision activations, as in the model."""
    q, kv, rel = _inputs(1, 1, 4, 4, 2, 2, 2, 1, 1)
    rel.requires_grad_()
    k, v = kv.split([4, 4], 2)
    with torch.autocast(DEVICE, dtype=torch.float16):  # fp16: see LOW_PRECISION
        out = halo_attention(q, k, v, rel[0], rel[1], 2, 1, impl="triton")
    (qh, kh, vh, rh), (qf, kf, vf, rf) = lowp([q, k, v, rel], torch.float16)
    assert out.dtype == torch.float16
    assert_rounding(out, halo_attention_reference(qf, kf, vf, rf[0], rf[1], 2, 1), torch.float16)
    (grad,) = torch.autograd.grad(out.float().sum(), rel)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_dispatch():
    q, kv, rel = _inputs(1, 1, 2, 2, 1, 1, 2, 1, 1)
    k, v = kv.split([2, 2], 2)
    q.requires_grad_()
    kernel = halo_attention(q, k, v, rel[0], rel[1], 2, 1, impl="triton")
    auto = halo_attention(q, k, v, rel[0], rel[1], 2, 1)  # auto: the kernels on CUDA, the reference on CPU
    assert type(kernel.grad_fn).__name__ == "_HaloFunctionBackward"
    assert (type(auto.grad_fn).__name__ == "_HaloFunctionBackward") == q.is_cuda
    q = q.detach()
    with pytest.raises(ValueError, match="does not support"):  # float64: reference only
        halo_attention(q.double(), k.double(), v.double(), rel[0].double(), rel[1].double(), 2, 1, impl="triton")
    q10, kv10, rel10 = _inputs(1, 1, 2, 2, 1, 1, 10, 1, 1)  # blocks > 8 x 8: the reference only
    with pytest.raises(ValueError, match="does not support"):
        halo_attention(q10, *kv10.split([2, 2], 2), rel10[0], rel10[1], 10, 1, impl="triton")
    with pytest.raises(TypeError, match="dtypes differ"):
        halo_attention(q, k, v.half(), rel[0], rel[1], 2, 1, impl="triton")
    with pytest.raises(ValueError, match="divisible by block_size"):
        halo_attention(q, k, v, rel[0], rel[1], 3, 1, impl="triton")
    q, kv, rel = _inputs(1, 1, 2, 2, 1, 1, 2, 8, 1)  # a 18 x 18 window (HaloNet-H5's size): reference only
    with pytest.raises(ValueError, match="does not support"):
        halo_attention(q, kv[:, :, :2], kv[:, :, 2:], rel[0], rel[1], 2, 8, impl="triton")
    q, kv, rel = _inputs(1, 1, 64, 2, 1, 1, 2, 1, 1)  # fp32 with a q/k head > 32: too much shared memory
    with pytest.raises(ValueError, match="does not support"):
        halo_attention(q, kv[:, :, :64], kv[:, :, 64:], rel[0], rel[1], 2, 1, impl="triton")
    halo_attention(q.half(), kv[:, :, :64].half(), kv[:, :, 64:].half(), rel[0].half(), rel[1].half(), 2, 1,
                   impl="triton")  # fp16 takes it


@pytest.mark.parametrize("op", ["halo_attention_fwd", "halo_attention_bwd"])
def test_custom_op_registration(op):
    """torch.library.opcheck: fake (meta) functions, schema, autograd registration (needed by torch.compile)."""
    torch.manual_seed(0)
    q, kv, rel = _inputs(1, 1, 3, 2, 2, 1, 2, 1, 1)
    k, v = kv[:, :, :3].contiguous(), kv[:, :, 3:].contiguous()
    if op == "halo_attention_fwd":
        args = tuple(t.requires_grad_() for t in (q, k, v, rel[0].clone(), rel[1].clone())) + (2, 1, 1, 0.5)
    else:
        out, lse = torch.ops.metamixer.halo_attention_fwd(q, k, v, rel[0], rel[1], 2, 1, 1, 0.5)
        args = (torch.randn_like(out), q, k, v, rel[0], rel[1], out, lse, 2, 1, 1, 0.5)
    torch.library.opcheck(getattr(torch.ops.metamixer, op), args)


def test_torch_compile_uses_the_custom_op():
    """Under torch.compile the kernels are an opaque custom op with a registered backward (aot_eager: no codegen)."""
    torch._dynamo.reset()
    q, kv, rel = (t.requires_grad_() for t in _inputs(1, 3, 3, 5, 2, 2, 2, 1, 1))
    fn = torch.compile(lambda q, kv, rel: halo_attention(q, *kv.split([3, 5], 2), rel[0], rel[1], 2, 1,
                                                         impl="triton"), backend="aot_eager", fullgraph=True)
    out = fn(q, kv, rel)
    ref = halo_attention_reference(q, *kv.split([3, 5], 2), rel[0], rel[1], 2, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, kv, rel), g), torch.autograd.grad(ref, (q, kv, rel), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_halonet_attention_layer_on_the_kernel_path(monkeypatch):
    """HaloNet's layer (fused kv conv split into views, strided queries, channels-last) through
    METAMIXER_OPS_IMPL=triton."""
    from backbones.halonet import HaloAttention
    torch.manual_seed(0)
    layer = HaloAttention(12, num_heads=3, dim_head_qk=4, dim_head_v=6, block_size=4, halo_size=1, stride=2)
    layer.reset_parameters()
    x = torch.randn(1, 12, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    layer.to(DEVICE, memory_format=torch.channels_last)  # channels-last q and kv views, as under AMP training
    outs = []
    for impl in ("reference", "triton"):
        monkeypatch.setenv("METAMIXER_OPS_IMPL", impl)
        out = layer(x)
        outs.append((out, *torch.autograd.grad(out.square().sum(), list(layer.parameters()))))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
