"""nanops.timm.NativeScaler in timm's training step (its train_one_epoch's calls, timm's EMA and
clipping), CPU: the same numbers as timm's own on a healthy run; one corrupt batch skipped with
AMP off and on, weights, optimizer state, BatchNorm statistics and EMA as in a run without it."""
import math

import pytest
import torch
from torch import nn

timm_utils = pytest.importorskip("timm.utils")
import nanops.timm  # noqa: E402
from tiny_models import TinyAttentionNet as Tiny  # noqa: E402

BATCH, CORRUPT = 8, 2


def batches(corrupt: bool, drop: bool = False):
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(6)]
    if corrupt:
        out[CORRUPT][0][3, 5] = math.nan
    return [b for i, b in enumerate(out) if not (drop and i == CORRUPT)]


def train_one_epoch(model, data, *, scaler_kind: str, amp: bool = False, accum: int = 1, clip_grad=1.0):
    """timm train.py's train_one_epoch, reduced to its step: autocast, loss_scaler(...) (or, with
    no scaler, backward + dispatch_clip_grad + step), EMA update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = timm_utils.ModelEmaV3(model, decay=0.9)
    if scaler_kind == "nanops":
        loss_scaler = nanops.timm.NativeScaler(model, device="cpu", enabled=amp, ema=ema)
    elif scaler_kind == "timm":
        loss_scaler = timm_utils.NativeScaler(device="cpu") if amp else None
    for i, (x, y) in enumerate(data):
        need_update = (i + 1) % accum == 0
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            loss = nn.functional.mse_loss(model(x).float(), y) / accum
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode="norm", parameters=model.parameters(),
                        need_update=need_update)
        else:
            loss.backward()
            if need_update:
                timm_utils.dispatch_clip_grad(model.parameters(), clip_grad, mode="norm")
                optimizer.step()
        if need_update:
            optimizer.zero_grad()
            ema.update(model, step=i)
    if scaler_kind == "nanops":
        loss_scaler.close()
    return optimizer, ema, loss_scaler


def test_a_healthy_run_gives_timms_numbers():
    ours, theirs = Tiny(), Tiny()
    train_one_epoch(ours, batches(False), scaler_kind="nanops")
    train_one_epoch(theirs, batches(False), scaler_kind="timm")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_corrupt_batch_leaves_weights_state_bn_and_ema_as_without_it():
    ours, ref = Tiny(), Tiny()
    opt, ema, scaler = train_one_epoch(ours, batches(True), scaler_kind="nanops")
    ref_opt, ref_ema, _ = train_one_epoch(ref, batches(True, drop=True), scaler_kind="nanops")
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for name, value in ref_ema.module.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], rtol=0, atol=0)
    assert scaler.scaler.skipped_steps == 1
    assert [(s.iteration, s.first_nonfinite) for s in scaler.skips] == [(CORRUPT, "forward of inp")]


def test_float16_amp_and_accumulation_skip_the_window_and_finish_finite():
    model = Tiny()
    _, ema, scaler = train_one_epoch(model, batches(True), scaler_kind="nanops", amp=True, accum=2)
    assert scaler.scaler.is_enabled() and scaler.scaler.total_steps == 3
    assert [s.iteration for s in scaler.skips if s.first_nonfinite == "forward of inp"] == [1]
    for module in (model, ema.module):
        assert all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def test_the_scaler_hooks_its_model_alone():
    from nanops._torch_private import hooks_observe

    model, other = Tiny(), Tiny()
    scaler = nanops.timm.NativeScaler(model, device="cpu", enabled=False)
    assert not hooks_observe([other]) and model._forward_pre_hooks  # nothing process-wide
    scaler.close()
    assert not model._forward_pre_hooks


def test_bad_arguments_are_refused_by_name():
    model = Tiny()
    with pytest.raises(TypeError, match="model"):
        nanops.timm.NativeScaler("cpu")
    scaler = nanops.timm.NativeScaler(model, device="cpu", enabled=False)
    loss = model(torch.randn(8, 16)).sum()
    with pytest.raises(ValueError, match="clip_mode"):
        scaler(loss, torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=1.0, clip_mode="max",
               parameters=model.parameters())
    scaler.close()
