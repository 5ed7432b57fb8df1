"""Divergence handling that recovers and does not cry wolf, and the Guard details around it
(nanops.training.Session's rollback, the smoothed growth rules, cut windows, loss arguments,
complex gradients, hyp files that are not text)."""
import math
import warnings

import pytest
import torch
from torch import nn

import nanops
from nanops.training import DivergenceLimits, DivergenceWatch


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    return x, x.sum(1, keepdim=True) * 0.1


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _steps(guard, model, x, y, steps, poison=lambda step: False):
    """Runs `steps` guarded steps; a poisoned step gets an Inf grad. Returns the warnings said."""
    said = []
    for step in steps:
        loss = (model(x) - y).square().mean()
        loss.backward()
        if poison(step):
            model[0].weight.grad[0, 0] = math.inf
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard.step(loss=loss.detach())
        said += [str(w.message) for w in caught if "nanops" in str(w.message)]
    return said


def test_rollback_from_the_first_steps_restores_the_first_healthy_state():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = nanops.Guard(model, opt, on_divergence="rollback", check_every=5,
                         limits=DivergenceLimits(consecutive_skips=3))
    said = _steps(guard, model, x, y, range(1), lambda s: False)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    said += _steps(guard, model, x, y, range(1, 5), lambda s: True)  # every step from the second skipped
    assert any("Rolled back to optimizer step 1's model, optimizer" in m for m in said), said
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after_first[k], rtol=0, atol=0)


def test_nothing_to_roll_back_to_is_said():
    x, y = _data()
    model = _model()
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01), on_divergence="rollback",
                         check_every=4, limits=DivergenceLimits(consecutive_skips=3))
    said = _steps(guard, model, x, y, range(4), lambda s: True)  # not one healthy step
    assert any("Nothing to roll back to" in m for m in said), said


def test_a_skip_run_across_a_snapshot_rolls_back_to_before_it():
    x, y = _data()
    model = _model()
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01), on_divergence="rollback",
                         check_every=5, limits=DivergenceLimits(consecutive_skips=8))
    # Healthy steps 0-2, skipped from 3: the copies due at steps 5 and 10 fall inside the run and
    # are not taken; the rollback goes to the first healthy one.
    said = _steps(guard, model, x, y, range(15), lambda s: s >= 3)
    assert any("Rolled back to optimizer step 1's" in m for m in said), said


def test_the_lowered_lr_survives_a_scheduler_and_a_second_divergence_is_seen():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)  # recomputes lr from base_lrs
    ran_at = []
    opt.register_step_post_hook(lambda o, a, k: ran_at.append(o.param_groups[0]["lr"]))
    guard = nanops.Guard(model, opt, on_divergence="rollback", check_every=3,
                         limits=DivergenceLimits(consecutive_skips=3))
    poisoned = set(range(3, 6)) | set(range(9, 12))
    said = []
    for step in range(15):
        said += _steps(guard, model, x, y, [step], lambda s: s in poisoned)
        sched.step()
    rollbacks = [m for m in said if "Rolled back" in m]
    assert len(rollbacks) == 2, said  # the second run of skips is watched again and rolled back too
    assert guard.session.lr_factor.factor == pytest.approx(0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # the schedule's own value
    assert ran_at[-1] == pytest.approx(1e-4)                 # what the last step ran with


def test_rollback_under_amp_restores_the_loss_scale():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = nanops.Guard(model, opt, scaler, on_divergence="rollback", check_every=4,
                         limits=DivergenceLimits(consecutive_skips=3, scale_floor=0.0))
    said = []
    for step in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(x) - y).square().mean()
        scaler.scale(loss).backward()
        if step >= 1:
            model[0].weight.grad[0, 0] = math.inf
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard.step(loss=loss.detach())
        said += [str(w.message) for w in caught]
        if any("Rolled back" in m for m in said):
            break
    assert any("scaler" in m and "Rolled back" in m for m in said), said
    assert scaler.get_scale() == 1024.0  # the scale of the healthy state, not the backed-off one


def test_a_noisy_converging_run_is_not_flagged_and_a_run_away_still_is():
    g = torch.Generator().manual_seed(0)
    healthy = DivergenceWatch()
    for step in range(2000):
        # A converging classifier's batch losses: a decaying trend times heavy-tailed noise (a
        # batch far below the rest now and then, the case a best-single-batch rule flags).
        noise = math.exp(float(torch.randn((), generator=g)) * 1.5)
        healthy.record(torch.zeros(1), loss=torch.tensor(0.5 * math.exp(-step / 300) * noise),
                       total_norm=torch.tensor(2.0 * noise))
    assert healthy.read() == []
    running_away = DivergenceWatch()
    for step in range(200):
        value = 1.0 if step < 100 else 1.2 ** (step - 100)
        running_away.record(torch.zeros(1), loss=torch.tensor(value), total_norm=torch.tensor(value))
    assert {e.kind for e in running_away.read()} == {"loss", "norm"}


def test_a_window_cut_by_zero_grad_does_not_skip_the_next_one():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = nanops.Guard(model, opt)
    bad = x.clone()
    bad[0, 0] = math.nan
    loss = (model(bad) - y).square().mean()
    loss.backward()
    assert bool(guard.micro_batch(loss))
    opt.zero_grad()  # the epoch ends: the window is dropped without a step
    for _ in range(2):  # the next window, healthy
        loss = (model(x) - y).square().mean()
        loss.backward()
        assert not bool(guard.micro_batch(loss))
    assert not guard.step().skipped


def test_step_takes_a_python_number_as_loss_and_refuses_other_types_before_stepping():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = nanops.Guard(model, opt)
    loss = (model(x) - y).square().mean()
    loss.backward()
    assert not guard.step(loss=float(loss)).skipped
    loss = (model(x) - y).square().mean()
    loss.backward()
    before = model[0].weight.detach().clone()
    with pytest.raises(TypeError, match="loss must be a tensor or a number"):
        guard.step(loss="0.5")
    torch.testing.assert_close(model[0].weight.detach(), before, rtol=0, atol=0)  # nothing stepped


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_complex_gradients_are_clipped_as_torch_clips_them(norm_type):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(5, dtype=torch.complex64)), nn.Parameter(torch.randn(4, 3))]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref):
        a.grad = torch.randn_like(a) * 4
        b.grad = a.grad.clone()
    total = nanops.clip_grad_norm_(ours, 1.0, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type)
    torch.testing.assert_close(total, expected)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_a_skip_names_its_training_step():
    x, y = _data()
    model = _model()
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01))
    for step in range(4):
        data = x.clone()
        if step == 2:
            data[0, 0] = math.inf
        loss = (model(data) - y).square().mean()
        loss.backward()
        result = guard.step(locate=lambda: (model(data) - y).square().mean())
    assert [(step, f.step) for step, f in guard.findings] == [(2, 2)]
    assert str(guard.findings[0][1]).startswith("step 2: forward of 0")


def test_doctor_says_a_hyp_file_is_not_text(tmp_path, capsys):
    from nanops.cli import main

    hyp = tmp_path / "hyp.yaml"
    hyp.write_bytes(b"lr0: 0.01\nmomentum: \xff\xfe\n")
    assert main(["doctor", "--hyp", str(hyp)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_a_finite_but_exploding_validation_is_a_divergence_from_the_first_validation():
    watch = DivergenceWatch()
    assert watch.validation(True, True, 10, val_loss=3.2, train_loss=2.9) is None  # healthy
    event = watch.validation(True, True, 20, val_loss=1.9e14, train_loss=4.0)
    assert event is not None and event.kind == "validation" and "training loss" in event.detail
    first = DivergenceWatch()  # the very first validation of a run away
    assert first.validation(True, True, 5, val_loss=5e3, train_loss=3.0).kind == "validation"
    trend = DivergenceWatch()
    trend.validation(True, True, 5, val_loss=2.0, train_loss=1.9)
    assert trend.validation(True, True, 6, val_loss=900.0, train_loss=100.0).detail.startswith(
        "the validation loss grew")
