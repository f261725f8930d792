"""The install: models and ops need only the core dependencies; the training stack is the `train` extra."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["lightning", "torchmetrics", "hydra-core", "omegaconf", "wandb", "scikit-learn"]
# import names of the train extra (wandb is left out: timm imports it by itself whenever it is installed)
TRAIN_MODULES = ["lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "hydra", "omegaconf", "sklearn"]


def _name(req: str) -> str:
    return req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip()


def test_import_backbones_and_ops_loads_no_training_package():
    code = ("import sys, backbones, ops, timm; timm.create_model('van_b0'); "
            f"print(sorted(m for m in {TRAIN_MODULES!r} if m in sys.modules))")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_training_stack_is_the_train_extra_and_dev_includes_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    assert {"torch", "timm", "safetensors", "triton"} <= core
    assert not core & set(TRAIN)
    extras = project["optional-dependencies"]
    assert {_name(r) for r in extras["train"]} == set(TRAIN)
    assert "metamixer-hub[train]" in extras["dev"]
    assert {"pytest", "pytest-xdist"} <= {_name(r) for r in extras["dev"]}
