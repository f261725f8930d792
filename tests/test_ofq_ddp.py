"""OFQ under DDP: 2 CPU processes (gloo) through train.py equal 1 process at the same global batch (the mechanism of
test_training's DDP test), with the first-batch LSQ initialisation, the CGA phase and the oscillation tracking on.

SGD (``optim=sgd``, momentum), not AdamW: at 2 bits many gradients are sums of cancelling terms (LSQ step
gradients, ``round(v) - v``) whose last bits depend on the summation order (per process + all-reduce vs one batch);
AdamW's first updates are ``lr * sign(g)`` and turn that rounding noise into lr-sized differences (measured: up to
3e-3 after 4 AdamW steps, < 1e-6 with SGD)."""
import torch

from test_training import TINY, make_cfg, read_checkpoint, run_train_py, train, weights


def test_ofq_ddp_two_processes_match_one_process(tmp_path):
    # epoch 0: LSQ steps initialised from the first batch (averaged over ranks), QAT; epoch 1: the CGA phase
    common = TINY + ["module.freeze_bn=true", "data.scale=[1.0,1.0]", "data.ratio=[1.0,1.0]", "trainer.max_epochs=2",
                     "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger=none", "optim=sgd",
                     "callbacks=ofq", "ofq.wbits=2", "ofq.abits=2", "ofq.cga_epochs=1", "ofq.boundary_range=0.05"]
    ddp = tmp_path / "ddp"
    run_train_py([*common, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=8",
                  f"hydra.run.dir={ddp}"])
    train(make_cfg(tmp_path / "single", common + ["data.batch_size=16"]))
    ck = read_checkpoint(ddp / "checkpoints/last.ckpt")
    assert ck["global_step"] == 4 and ck["ofq"]["wbits"] == 2
    a, b = weights(ddp / "checkpoints/last.ckpt"), weights(tmp_path / "single/checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    steps = [k for k in a if k.startswith("model.") and k.endswith(".aq.step")]
    assert len(steps) > 10
    for k in a:  # weights, LSQ steps (init + gradient scale), shifts, EMA copy
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert sum(not torch.allclose(a[k], torch.ones_like(a[k])) for k in steps) == len(steps)  # initialised
