"""The float16 headroom monitor: a module growing toward 65504 is named, with its trend, before it
overflows; its figures are the float64 truth; healthy models raise nothing; the policies act.
CPU float16 autocast stands in for CUDA's (the same dtype rules for Linear, matmul, conv)."""
import csv
import math
import warnings

import pytest
import torch
from torch import nn

import nanops
from nanops.training import HEADROOM_CSV, HeadroomMonitor, Session

FP16 = dict(device_type="cpu", dtype=torch.float16)


class Amplifier(nn.Module):
    """A Linear whose output is multiplied by a gain the test doubles: activations that grow."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.register_buffer("gain", torch.tensor(40.0))

    def forward(self, x):
        return self.lin(x) * self.gain


def growing_model():
    torch.manual_seed(0)
    # LayerNorm runs in float32 under autocast: NaN from an overflowed float16 input, finite from a
    # float32 one (the Amplifier promoted), whatever the gain.
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Amplifier(16), nn.LayerNorm(16), nn.Linear(16, 4))


def train(model, guard, scaler, steps, double_every=3, x=None):
    """Steps under CPU float16 autocast, the Amplifier's gain doubled every `double_every` steps.
    Returns (the first step whose loss was non-finite or None, [(step, warning text)])."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)) if x is None else x
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            if step and step % double_every == 0:
                model[2].gain *= 2
            with torch.autocast(**FP16):
                loss = model(x).float().mean()
            if not torch.isfinite(loss):
                return step, [(s, t) for s, t in said]
            scaler.scale(loss).backward()
            guard.step(loss=loss)
            said += [(step, str(w.message)) for w in caught[len(said):]]
    return None, said


def test_a_module_whose_output_doubles_is_named_with_its_trend_before_its_first_overflow():
    model = growing_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=1e-5), scaler, check_every=3,
                         headroom_every=1)
    first_bad, said = train(model, guard, scaler, 60)
    assert first_bad is not None  # the gain does overflow float16 in the end
    reports = [(s, t) for s, t in said if "float16 headroom" in t]
    assert reports and reports[0][0] < first_bad
    step, text = reports[-1]
    assert step < first_bad
    assert text.split("headroom: ")[1].startswith("2 at 1/")  # the Amplifier, tightest first
    assert "x2 per 3 steps: overflow expected in ~" in text
    assert not any("headroom" in t for s, t in said if s < reports[0][0] - 6)  # nothing while far away


def test_the_monitor_figures_are_the_float64_values():
    torch.manual_seed(0)
    lin = nn.Linear(8, 24)
    mha = nn.MultiheadAttention(24, 3)
    x = torch.randn(10, 2, 8) * 30

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.mha = lin, mha

        def forward(self, x):
            return self.mha(*(self.lin(x),) * 3)[0]

    net = Net().train()
    seen = {}
    net.mha.register_forward_pre_hook(lambda m, args: seen.update(q=args[0].detach()))
    monitor = HeadroomMonitor(net, every=1, warn_within=1e9)
    monitor.begin()
    with torch.autocast(**FP16):
        net(x).float().sum().backward()
    monitor.stepped(torch.zeros(1))
    got = {h.name: h.fraction * 65504 for h in (monitor.read(), monitor.latest)[1]}

    lin64 = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert got["lin"] == pytest.approx(lin64.abs().max().item(), rel=2e-3)  # float16's rounding of it
    q_in = seen["q"].double()  # the float16 input the attention was given
    wq, wk, _ = mha.in_proj_weight.double().chunk(3)
    bq, bk, _ = mha.in_proj_bias.double().chunk(3)
    q = (q_in @ wq.T + bq).reshape(10, 2 * 3, 8).transpose(0, 1)
    k = (q_in @ wk.T + bk).reshape(10, 2 * 3, 8).transpose(0, 1)
    logits = (q @ k.transpose(1, 2)) / math.sqrt(8)
    assert got["mha q·k"] == pytest.approx(logits.abs().max().item(), rel=1e-5)


def test_a_yolov5_transformer_layer_keeps_its_fold_and_its_q_k_is_measured():
    common = pytest.importorskip("nanops.yolov5.shims").import_yolov5_common()
    torch.manual_seed(0)
    layer = common.TransformerLayer(32, 4).train()
    model = nn.Sequential(layer)
    nanops.patch(model)
    x = (torch.randn(40, 2, 32) * 8).half()  # as a float16 conv hands it over under autocast
    monitor = HeadroomMonitor(model, every=1, warn_within=1e9)
    monitor.begin()
    children = (layer.q, layer.k, layer.v, layer.ma, layer.fc1, layer.fc2)
    assert not any(m._forward_hooks for m in children)  # nanops' folded layer stays folded
    with torch.autocast(**FP16):
        model(x).float().sum().backward()
    monitor.stepped(torch.zeros(1))
    monitor.read()
    got = {h.name: h.fraction * 65504 for h in monitor.latest}
    x64 = x.double()
    wq, wk, _ = layer.ma.in_proj_weight.double().chunk(3)
    bq, bk, _ = layer.ma.in_proj_bias.double().chunk(3)
    q = (x64 @ layer.q.weight.double().T) @ wq.T + bq
    k = (x64 @ layer.k.weight.double().T) @ wk.T + bk
    q, k = (t.reshape(40, 2 * 4, 8).transpose(0, 1) for t in (q, k))
    logits = q @ k.transpose(1, 2) / math.sqrt(8)
    assert got["0.ma q·k"] == pytest.approx(logits.abs().max().item(), rel=1e-4)
    assert "0" in got and not any(name.startswith("0.") and "q·k" not in name for name in got)


def test_a_skipped_step_does_not_count_and_unsampled_steps_run_no_hook():
    model = growing_model()
    monitor = HeadroomMonitor(model, every=2, warn_within=1e9)
    x = torch.randn(4, 8)
    for step, bad in enumerate((False, False, True)):
        monitor.begin()
        assert monitor.sampling == (step % 2 == 0)
        assert bool(model[0]._forward_hooks) == monitor.sampling
        with torch.autocast(**FP16):
            model(x * (math.inf if bad else 1.0)).float().sum().backward()
        monitor.stepped(torch.tensor([float(bad)]))
    first = monitor.read()
    assert all(math.isfinite(h.fraction) for h in first) and first  # step 2 (inf input) left out
    assert not model[0]._forward_hooks


def test_on_headroom_promote_runs_the_module_in_float32_before_it_overflows():
    model = growing_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=1e-5), scaler, check_every=3,
                         headroom_every=1, on_headroom="promote")
    first_bad, said = train(model, guard, scaler, 45)
    assert first_bad is None  # the gain reaches 40 * 2**14: past 65504, but in float32
    assert "2" in guard.promoted
    assert any("Run in float32 from now on, ahead of an overflow: 2" in t for _, t in said)


def test_on_headroom_stop_raises_with_the_diagnosis():
    model = growing_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=1e-5), scaler, check_every=3,
                         headroom_every=1, on_headroom="stop")
    with pytest.raises(nanops.Diverged, match=r"float16 headroom: 2 at 1/.*Stopping"):
        train(model, guard, scaler, 60)


def test_the_figures_go_to_a_csv_per_read_and_guard_headroom_reads_now(tmp_path):
    model = growing_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=1e-5), scaler, check_every=100,
                         headroom_every=1, save_dir=tmp_path)
    train(model, guard, scaler, 4, double_every=100)
    guard.epoch_end()
    train(model, guard, scaler, 4, double_every=100)
    now = guard.headroom()
    assert now[0].name == "2" and now[0].growth == pytest.approx(1.0, rel=0.05)
    with (tmp_path / HEADROOM_CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert {r["period"] for r in rows} == {"epoch 0", "step 8"}
    row = next(r for r in rows if r["period"] == "step 8" and r["module"] == "2")
    assert float(row["max_abs"]) == pytest.approx(now[0].fraction * 65504, rel=1e-5)


def test_healthy_models_raise_no_headroom_warning_and_amp_off_watches_nothing():
    model = growing_model()
    model[2].gain.fill_(1.0)
    scaler = torch.amp.GradScaler("cpu")
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01), scaler, check_every=2,
                         headroom_every=1)
    _, said = train(model, guard, scaler, 12, double_every=1000)
    assert not any("headroom" in t for _, t in said) and guard.session.headroom.history
    plain = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01), None, headroom_every=1)
    assert plain.headroom() == [] and plain.session.headroom is None


def test_a_yolov5_model_at_its_defaults_raises_no_headroom_warning():
    models = pytest.importorskip("nanops.yolov5.models")
    torch.manual_seed(0)
    model = models.build_transformer_model().train()
    scaler = torch.amp.GradScaler("cpu")
    guard = nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937), scaler,
                         check_every=2, headroom_every=1)
    x = torch.rand(2, 3, 128, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            with torch.autocast(**FP16):
                loss = sum(o.float().sigmoid().mean() for o in model(x))
            scaler.scale(loss).backward()
            guard.step(loss=loss)
    assert not any("headroom" in str(w.message) for w in caught)
    seen = {h.name for h in guard.session.headroom.latest}
    assert "model.8.m.tr.0.ma q·k" in seen and "model.0.act" not in seen  # a shared SiLU is its parents'


def test_a_compiled_model_is_not_hooked_and_it_is_said_once():
    model = growing_model()
    model.compile()
    session = Session(headroom_every=1)
    session.attach(model, amp=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session.begin_batch()
        session.begin_batch()
    assert session.headroom.compiled and not model[0]._forward_hooks
    assert sum("headroom monitor is off" in str(w.message) for w in caught) == 1


def test_bad_arguments_name_themselves():
    model = growing_model()
    with pytest.raises(ValueError, match="on_headroom"):
        nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), on_headroom="loud")
    with pytest.raises(ValueError, match="headroom_every"):
        nanops.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), headroom_every=0)
    with pytest.raises(ValueError, match="warn_within"):
        HeadroomMonitor(model, warn_within=0.5)


def test_a_read_per_epoch_says_its_trend_in_epochs():
    from nanops.training import Headroom

    h = Headroom("model.8.m.0.tr.0.ma q·k", 1 / 12, 2.1, 1, "epoch", "model.8.m.0.tr.0")
    assert str(h) == ("model.8.m.0.tr.0.ma q·k at 1/12 of float16's range, x2.1 per epoch: overflow expected in "
                      "~4 epochs")  # log(12) / log(2.1) = 3.35 epochs
    assert not h.imminent and Headroom("m", 0.6, None, 1, "epoch", "m").imminent
    assert "reached float16's range" in str(Headroom("m", 1.5, 3.0, 1, "epoch", "m"))
    assert str(Headroom("m", 0.25, 0.9, 100, "step", "m")) == "m at 1/4 of float16's range, x0.9 per 100 steps"
