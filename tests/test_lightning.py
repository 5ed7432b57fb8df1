"""nanops.lightning.Protect in real Lightning fits (CPU): one corrupt batch is skipped with AMP off
and on, the weights, optimizer state and BatchNorm statistics end as in a fit without that batch,
the step's scheduler step is held back, the module is named, accumulation and clipping work."""
import copy
import math

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
import nanops  # noqa: E402
import nanops.lightning  # noqa: E402
from tiny_models import TinyAttentionNet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # Lightning's own

CORRUPT = 1  # the batch index (epoch 0) given a NaN
BATCH = 8


class Tiny(L.LightningModule):
    """A Linear, a BatchNorm and an nn.MultiheadAttention over 4 tokens, SGD with momentum and a
    step-interval StepLR."""

    def __init__(self, scheduler: bool = True):
        super().__init__()
        self.net = TinyAttentionNet()
        self.scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data(corrupt: bool, drop_corrupt: bool = False):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6 * BATCH, 16, generator=g), torch.randn(6 * BATCH, 1, generator=g)
    if corrupt:
        x[CORRUPT * BATCH + 3, 5] = math.nan
    if drop_corrupt:
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[CORRUPT * BATCH:(CORRUPT + 1) * BATCH] = False
        x, y = x[keep], y[keep]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def fit(model, loader, tmp_path, precision="32-true", callbacks=(), **kwargs):
    cpu16 = precision == "16-mixed"  # Lightning turns it into bf16 on CPU: its fp16 plugin put in by hand
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision="32-true" if cpu16 else precision,
                        callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)
    if cpu16:
        from lightning.pytorch.plugins.precision import MixedPrecision

        trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu")
    trainer.fit(model, loader)
    return trainer


def state(model, trainer):
    opt = trainer.optimizers[0]
    momenta = [opt.state[p]["momentum_buffer"] for p in model.parameters() if p in opt.state]
    return model.state_dict(), momenta, opt.param_groups[0]["lr"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_corrupt_batch_leaves_the_fit_as_if_it_had_not_been_there(precision, tmp_path):
    protect = nanops.lightning.Protect()
    model = Tiny()
    trainer = fit(model, data(corrupt=True), tmp_path / "ours", precision, [protect])
    reference = Tiny()
    ref_trainer = fit(reference, data(corrupt=False, drop_corrupt=True), tmp_path / "ref", precision)

    ours, ours_momenta, ours_lr = state(model, trainer)
    ref, ref_momenta, ref_lr = state(reference, ref_trainer)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)  # weights and BN statistics
    for a, b in zip(ours_momenta, ref_momenta):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ours_lr == pytest.approx(ref_lr)  # the skipped step's scheduler step was held back
    assert [(s.epoch, s.iteration, s.batch, s.first_nonfinite) for s in protect.skips] == [
        (0, CORRUPT, CORRUPT, "forward of net.inp")]
    assert protect.scaler.skipped_steps == 1 and protect.scaler.total_steps == 6
    assert (tmp_path / "ours" / "nanops_skipped_steps.csv").read_text().count("\n") == 2


def test_float16_amp_skips_the_corrupt_batch_and_finishes_finite(tmp_path):
    protect = nanops.lightning.Protect()
    model = Tiny()
    fit(model, data(corrupt=True), tmp_path, "16-mixed", [protect])
    assert protect.plugin.scaler.is_enabled()
    assert [s.first_nonfinite for s in protect.skips if s.finding is not None][:1] == ["forward of net.inp"]
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_accumulation_and_clipping_go_through_nanops(tmp_path):
    protect = nanops.lightning.Protect()
    model = Tiny(scheduler=False)
    before = copy.deepcopy(model.net.norm.state_dict())
    fit(model, data(corrupt=True), tmp_path, "32-true", [protect], accumulate_grad_batches=2,
        gradient_clip_val=0.5)
    # 6 batches, 2 per step: the window holding batch 1 (batches 0-1) is skipped.
    assert protect.scaler.total_steps == 3 and protect.scaler.skipped_steps == 1
    assert [s.iteration for s in protect.skips] == [0]
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert not torch.equal(model.net.norm.running_mean, before["running_mean"])  # healthy batches counted


def test_stop_ends_the_fit_with_the_diagnosis(tmp_path):
    limits = nanops.training.DivergenceLimits(consecutive_skips=3)
    protect = nanops.lightning.Protect(on_divergence="stop", check_every=3, limits=limits)
    g = torch.Generator().manual_seed(1)
    x = torch.full((6 * BATCH, 16), math.nan)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randn(6 * BATCH, 1, generator=g)),
                                         batch_size=BATCH)
    with pytest.raises(nanops.Diverged, match="consecutive skipped steps.*checkpoints written before stay"):
        fit(Tiny(scheduler=False), loader, tmp_path, "32-true", [protect])


def test_patch_attention_swaps_the_modules_attention(tmp_path):
    protect = nanops.lightning.Protect(patch_attention=True)
    model = Tiny(scheduler=False)
    fit(model, data(corrupt=False), tmp_path, "32-true", [protect])
    assert "nanops" in type(model.net.attn).__module__
    assert protect.skips == []


def test_unsupported_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="on_divergence"):
        nanops.lightning.Protect(on_divergence="rollback")
    with pytest.raises(ValueError, match="precision='64-true'"):
        fit(Tiny(scheduler=False), data(corrupt=False), tmp_path, "64-true", [nanops.lightning.Protect()])
