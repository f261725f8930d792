"""eval.py: accuracy / params / GMACs / throughput / JSON from a Lightning checkpoint, a hub checkpoint or an export;
export to timm's hub format and reload with identical outputs; bad input gives clear errors and loses nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from PIL import Image

from backbones.training import (count_macs, evaluate, export_hub, load_eval_model, register_model_configs,
                                train)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY_MODEL = ["model.kwargs.embed_dim=[16,32,64,128]", "model.kwargs.depth=[1,1,1,1]", "model.kwargs.in_dim=16"]
FAST_BENCH = ["bench.batch_size=8", "bench.iters=1", "bench.warmup=1"]

register_model_configs(str(CONF))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(out: Path, overrides=(), config="eval"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=[f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A Lightning checkpoint of a tiny ffnet_t trained briefly on digits (with EMA)."""
    out = tmp_path_factory.mktemp("train")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(make_cfg(out, TINY_MODEL + [
        "data.batch_size=32", "trainer.max_epochs=5", "trainer.limit_train_batches=8", "trainer.accelerator=cpu",
        "optim.optimizer.lr=2e-2", "optim.scheduler.warmup_epochs=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none",
        "module.ema_decay=0.9"], config="train"))
    torch.set_num_threads(n)
    return out / "checkpoints" / "best.ckpt"


@pytest.fixture
def three_class_folder(tmp_path) -> Path:
    for c in range(3):
        for split in ("train", "validation"):
            (tmp_path / "three" / split / f"c{c}").mkdir(parents=True)
            Image.new("RGB", (40, 40), (90 * c, 20, 20)).save(tmp_path / "three" / split / f"c{c}" / "0.png")
    return tmp_path / "three"


def test_eval_lightning_checkpoint_export_and_hub_checkpoint(ckpt, tmp_path):
    export = tmp_path / "export"
    r = evaluate(make_cfg(tmp_path, FAST_BENCH + [f"ckpt={ckpt}", f"export_dir={export}"]))
    assert json.loads((tmp_path / "eval.json").read_text()) == r
    assert r["weights"].startswith("EMA weights") and r["images"] == 360 and r["num_classes"] == 10
    assert 60 <= r["top1"] <= r["top5"] <= 100 and r["input_size"] == [3, 32, 32]  # chance: 10; measured 87
    model, _ = load_eval_model("ffnet_t", None, 10, ckpt=str(ckpt))
    model.eval()
    assert r["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert r["gmacs"] == pytest.approx(count_macs(model, (3, 32, 32)) / 1e9) and r["gmacs"] > 0
    assert "gflops" not in r  # one unit, labelled: multiply-accumulates
    assert r["throughput_img_s"] > 0

    # the export is timm's hub format and reloads with identical outputs (EMA weights)
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert reloaded.pretrained_cfg["input_size"] == (3, 32, 32) and reloaded.pretrained_cfg["crop_pct"] == 1.0
    # evaluating the export, or the weights saved as a plain hub checkpoint, gives the same accuracy
    r_export = evaluate(make_cfg(tmp_path / "e2", FAST_BENCH + [f"ckpt={export}"]))
    assert r_export["top1"] == r["top1"]
    torch.save({"model": reloaded.state_dict()}, tmp_path / "hub.pth")
    r_hub = evaluate(make_cfg(tmp_path / "e3", FAST_BENCH + TINY_MODEL + [f"ckpt={tmp_path / 'hub.pth'}"]))
    assert r_hub["top1"] == r["top1"] and r_hub["weights"].startswith("checkpoint")
    # without the EMA: the raw model weights
    r_raw = evaluate(make_cfg(tmp_path / "e4", FAST_BENCH + [f"ckpt={ckpt}", "use_ema=false"]))
    assert r_raw["weights"].startswith("model weights")


def test_mac_count_of_a_conv():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    # one multiply-add per (output channel, input channel, tap, output pixel), as papers and timm count GMACs
    assert count_macs(conv, (3, 8, 8)) == 4 * 3 * 9 * 8 * 8


def test_bad_input_is_clear_and_loses_nothing(ckpt, tmp_path, three_class_folder):
    out = tmp_path / "eval.json"
    out.write_text('{"previous": "result"}')
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(ckpt.read_bytes()[:5000])
    cases = [
        ([f"ckpt={corrupt}"], ValueError, "corrupt or not a checkpoint"),
        ([f"ckpt={tmp_path / 'missing.ckpt'}"], ValueError, "missing.ckpt. does not exist"),
        ([], ValueError, "nothing to evaluate"),
        (["pretrained=true"], ValueError, "pretrained ffnet_t has 1000 classes but the dataset has 10"),
        (["pretrained=true", "model.name=ffnet_x"], ValueError, "unknown model 'ffnet_x'"),
        (["data=imagefolder", f"data.root={tmp_path / 'nope'}", f"ckpt={ckpt}"], FileNotFoundError, "does not exist"),
        (["data=imagefolder", f"data.root={three_class_folder}", f"ckpt={ckpt}"], ValueError,
         "10 classes but the dataset has 3"),
    ]
    for overrides, exc, match in cases:
        with pytest.raises(exc, match=match):
            evaluate(make_cfg(tmp_path, FAST_BENCH + overrides))
    # exported folder and hub checkpoint with the wrong class count
    export = tmp_path / "export"
    model, _ = load_eval_model("ffnet_t", None, 10, ckpt=str(ckpt))
    export_hub(model, export)
    torch.save(model.state_dict(), tmp_path / "hub.pth")
    for path in (export, tmp_path / "hub.pth"):
        with pytest.raises(ValueError, match="classes but the dataset has 3"):
            evaluate(make_cfg(tmp_path, FAST_BENCH + TINY_MODEL + [
                "data=imagefolder", f"data.root={three_class_folder}", f"ckpt={path}"]))
    assert out.read_text() == '{"previous": "result"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.ckpt", "eval.json", "export", "hub.pth", "three"]


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    model = timm.create_model("ffnet_t", num_classes=3, embed_dim=(16, 32, 64, 128), depth=(1, 1, 1, 1), in_dim=16)
    export_hub(model, tmp_path / "export")
    before = (tmp_path / "export" / "model.safetensors").read_bytes()

    def broken(model, save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(timm.models, "save_for_hf", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hub(model, tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
