"""`import backbones` registers every hub model with timm, and never overwrites a timm registration."""
import subprocess
import sys
from pathlib import Path

import timm
import timm.models._registry as registry

import backbones

FAMILY_MODULES = sorted(p.stem for p in Path(backbones.__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def test_import_emits_no_overwrite_warning():
    code = "import warnings; warnings.simplefilter('always'); import backbones"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Overwriting" not in res.stderr, res.stderr


def test_every_family_module_is_imported_and_registers_models():
    assert FAMILY_MODULES, "no family modules found"
    for mod in FAMILY_MODULES:
        assert f"backbones.{mod}" in sys.modules, f"backbones/__init__.py does not import {mod}"
        names = [n for n, fn in registry._model_entrypoints.items() if fn.__module__ == f"backbones.{mod}"]
        assert names, f"backbones.{mod} registers no model"
        for n in names:
            assert timm.is_model(n)
