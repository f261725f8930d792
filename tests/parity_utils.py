"""Load the official-implementation parity fixtures copied into tests/fixtures/<family>/ and compare outputs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(family: str, name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], dict]:
    """Return (official state_dict, io tensors, json metadata) of fixture ``name``."""
    d = FIXTURES / family
    weights = load_file(str(d / f"{name}.weights.safetensors"))
    io = load_file(str(d / f"{name}.io.safetensors"))
    meta = json.loads((d / f"{name}.json").read_text())
    return weights, io, meta


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (a relative bound that tolerates values near zero)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:g} * max|ref| {scale:.3e}"


def second_sample(x: torch.Tensor, seed: int = 123) -> torch.Tensor:
    """The fixture input stacked with another random sample (checks batch handling: row 0 must not change)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([x, torch.randn(x.shape, generator=g, dtype=x.dtype)], 0)


def assert_grad_checkpointing_matches(model: torch.nn.Module, x: torch.Tensor, monkeypatch) -> None:
    """``set_grad_checkpointing(True)`` checkpoints at least one block and leaves output and gradients unchanged."""
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    assert calls, "no block was checkpointed"
    assert_rel_close(out, ref, 1e-6, "checkpointed output")
    for g, p in zip(ref_grads, model.parameters()):
        assert p.grad is not None
        assert_rel_close(p.grad, g, 1e-5, "checkpointed grads")
