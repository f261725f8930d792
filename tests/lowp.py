"""Low-precision checks for the ops' Triton kernels: the reference computed in fp32 from the SAME low-precision
inputs, and a bound of about one rounding step of the output dtype.

A kernel that accumulates in fp32 and rounds its result once differs from that reference by the final rounding
alone: a relative error (norm of the difference over norm of the reference) below one rounding step, ``2**-p`` for
``p`` significand bits (bf16 8, fp16 11). A kernel that accumulates or keeps intermediates in the low dtype misses
the bound by a multiple (``test_op_dwconv.py`` shows a 7x7 depthwise conv accumulating in bf16 failing it).

Triton's interpreter (CPU runs, ``TRITON_INTERPRET=1``) converts fp32 to bf16 by truncation, not to nearest: its
error reaches a whole bf16 ulp, ``2**-7``, so that is one bf16 step there. fp16 rounds to nearest in both.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ops._dispatch import interpreting

ROUNDING_STEP = {torch.bfloat16: 2.0 ** (-7 if interpreting() else -8), torch.float16: 2.0 ** -11}


def to_low(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` converted to ``dtype`` as the Triton kernels convert (truncating to bf16 under the interpreter)."""
    if dtype == torch.bfloat16 and interpreting():
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low 16 bits zero
    return t.to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` (Frobenius norms, in float64)."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


def lowp(tensors: Sequence[torch.Tensor], dtype: torch.dtype):
    """The low-precision inputs (leaves that require grad where the input does) and their fp32 upcasts (leaves
    too), to feed the kernel and the reference respectively."""
    low = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]
    up = [t.detach().float().requires_grad_(t.requires_grad) for t in low]
    return low, up


def assert_rounding(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, steps: float = 1.0, what: str = ""):
    """``out`` within ``steps`` rounding steps of ``dtype`` of the fp32 ``ref`` (relative, in norm)."""
    err, bound = rel_err(out, ref), steps * ROUNDING_STEP[dtype]
    assert err <= bound, f"{what} {dtype}: relative error {err:.2e} > {steps:g} rounding step(s) = {bound:.2e}"
