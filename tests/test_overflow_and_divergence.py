"""Beyond skipping: a float16 overflow cured by running the overflowing module in float32 (CPU
autocast float16), and a lost run noticed from the step's own numbers, with a policy."""
import math
import warnings

import pytest
import torch
from torch import nn

import nanops
from nanops.training.divergence import DivergenceLimits, DivergenceWatch
from nanops.training.promote import demote_all, is_promoted


class Block(nn.Module):
    """An FFN whose hidden activations overflow float16 once `gain` is large, while its output
    stays moderate (the overflow is in the block's own code, between its children)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.register_buffer("gain", torch.tensor(1.0))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x) * self.gain)) / self.gain


def make(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), Block(), nn.Linear(8, 1))


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    return x, x.sum(1, keepdim=True) * 0.1


def loss_of(model, x, y):
    with torch.autocast("cpu", dtype=torch.float16):
        return (model(x).float() - y).square().mean()


@pytest.fixture(autouse=True)
def _forget_promotions():
    demote_all()
    yield
    demote_all()


def test_plain_amp_skips_forever_nanops_promotes_and_trains_on():
    x, y = data()
    plain, ours = make(), make()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    plain_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ours_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = nanops.Guard(ours, ours_opt, ours_scaler)
    plain_losses, our_losses, plain_skips = [], [], 0
    for step in range(40):
        if step == 3:
            plain[1].gain.fill_(1e6)
            ours[1].gain.fill_(1e6)  # fc1 * gain leaves float16's range from here on
        loss = loss_of(plain, x, y)
        plain_scaler.scale(loss).backward()
        scale_before = plain_scaler.get_scale()
        plain_scaler.step(plain_opt)
        plain_scaler.update()
        plain_skips += plain_scaler.get_scale() < scale_before
        plain_opt.zero_grad()
        plain_losses.append(loss.item())
        guard.begin()
        loss = loss_of(ours, x, y)
        ours_scaler.scale(loss).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard.step(locate=lambda: loss_of(ours, x, y), loss=loss)
        our_losses.append(loss.item())
        if any("runs in float32" in str(w.message) for w in caught):
            promoted_at = step
    assert plain_skips >= 30 and not math.isfinite(plain_losses[-1])  # every step from 3 on is lost
    assert guard.promoted == ["1"] and is_promoted(ours[1]) and promoted_at == 3
    assert guard.skipped_steps == 1
    assert math.isfinite(our_losses[-1]) and our_losses[-1] < 0.5 * our_losses[4]  # still learning


def test_a_corrupt_batch_is_not_mistaken_for_an_overflow():
    x, y = data()
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = nanops.Guard(model, opt, torch.amp.GradScaler("cpu"))
    bad = x.clone()
    bad[0, 0] = math.inf
    guard.scaler.scale(loss_of(model, bad, y)).backward()
    result = guard.step(locate=lambda: loss_of(model, bad, y))
    assert result.skipped and guard.promoted == [] and not is_promoted(model[1])


def test_promotion_is_not_pickled_and_checkpoints_stay_plain(tmp_path):
    model = make()
    nanops.training.promote(model[1])
    torch.save(model, tmp_path / "m.pt")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "m.pt")
    assert not [n for n in names if "nanops" in n]
    assert not hasattr(model[1], "_forward_pre_hooks") or not model[1]._forward_pre_hooks


def test_fifty_consecutive_skips_fire_once_and_memory_stays_flat():
    watch = DivergenceWatch(DivergenceLimits(consecutive_skips=10))
    events = []
    for step in range(50):
        watch.record(torch.ones(1), loss=torch.tensor(math.nan), total_norm=torch.tensor(math.inf),
                     scale=torch.tensor(2.0 ** (16 - step)))
        if step % 10 == 9:
            events += watch.read()
    kinds = [e.kind for e in events]
    assert kinds.count("skips") == 1 and kinds.count("scale") == 1 and len(events) == 2
    assert watch._state.numel() == 10  # the state is a fixed handful of numbers


def test_growing_loss_and_norm_are_noticed():
    watch = DivergenceWatch(DivergenceLimits(settle_steps=2))
    for step in range(30):
        value = torch.tensor(1.0 if step < 10 else 10.0 ** (step - 9))
        watch.record(torch.zeros(1), loss=value, total_norm=value * 3)
    kinds = {e.kind for e in watch.read()}
    assert kinds == {"loss", "norm"}
    assert watch.read() == []  # each kind once


def test_a_run_away_lr_stops_with_its_cause_under_the_stop_policy():
    x, y = data()
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.5)  # past 2 / curvature: the loss grows ~4x a step
    guard = nanops.Guard(model, opt, max_norm=1e9, on_divergence="stop", check_every=10,
                         limits=DivergenceLimits(settle_steps=2))
    with pytest.raises(nanops.Diverged, match="Likely cause: the learning rate is too high"):
        for _ in range(200):
            loss = (model(x) - y).square().mean()
            loss.backward()
            guard.step(loss=loss)


def test_rollback_policy_restores_the_last_good_state_and_lowers_the_lr():
    x, y = data()
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    in_step = {}  # the lr the step ran with (this hook runs before nanops' restores the schedule's)
    opt.register_step_post_hook(lambda o, a, k: in_step.update(lr=o.param_groups[0]["lr"]))
    guard = nanops.Guard(model, opt, on_divergence="rollback", check_every=5,
                         limits=DivergenceLimits(consecutive_skips=3, settle_steps=1))
    for step in range(15):
        loss = (model(x) - y).square().mean()
        loss.backward()
        if step >= 7:
            model[0].weight.grad[0, 0] = math.inf  # every step from 7 on is skipped
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard.step(loss=loss)
        if any("Rolled back" in str(w.message) for w in caught):
            break
    assert guard.session.lr_factor.factor == pytest.approx(0.1)
    loss = (model(x) - y).square().mean()
    loss.backward()
    guard.step(loss=loss)
    # The step ran at a tenth of the lr; the schedule's own value is left as it was.
    assert in_step["lr"] == pytest.approx(0.001) and opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_guard_validates_its_policy_arguments():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="on_divergence"):
        nanops.Guard(model, opt, on_divergence="panic")
    with pytest.raises(ValueError, match="check_every"):
        nanops.Guard(model, opt, check_every=0)


@pytest.mark.slow
def test_an_unpatched_yolov5_transformer_layer_overflowing_in_attention_is_promoted():
    from nanops.yolov5.shims import import_yolov5_common

    common = import_yolov5_common()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(16, 16)
            self.layer = common.TransformerLayer(16, 4)  # torch's attention: float16 q.k under autocast
            self.head = nn.Linear(16, 1)

        def forward(self, x, gain):
            return self.head(self.layer(self.embed(x) * gain).float() / gain)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(10, 4, 16)
    y = torch.randn(10, 4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    guard = nanops.Guard(net, opt, torch.amp.GradScaler("cpu", init_scale=2.0**8))
    losses = []
    for step in range(12):
        gain = 1.0 if step < 2 else 3000.0  # larger activations entering the transformer, as in the seed report

        def loss_fn():
            with torch.autocast("cpu", dtype=torch.float16):
                return (net(x, gain).float() - y).square().mean()

        guard.begin()
        loss = loss_fn()
        guard.scaler.scale(loss).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guard.step(locate=loss_fn)
        losses.append(loss.item())
    assert guard.promoted == ["layer.ma"] and guard.skipped_steps == 1
    assert all(math.isfinite(v) for v in losses[3:])
