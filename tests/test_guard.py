"""nanops.Guard: skip without host sync where the optimizer allows it, restore BatchNorm, and name
the first non-finite module of a skipped step by replaying it (forward, loss, backward)."""
import contextlib

import pytest
import torch

import nanops
from conftest import DEVICES


class ExplodeGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor` (inf/NaN when it overflows)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class Net(torch.nn.Module):
    """conv -> bn -> silu -> dropout -> linear head; `blow` makes block's backward non-finite."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.SiLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(8, 2)
        self.blow = 1.0  # gradient factor applied where block's output enters the rest of the net

    def forward(self, x):
        x = self.block(self.stem(x))
        x = ExplodeGrad.apply(x, self.blow)
        return self.head(self.drop(x.mean((2, 3))))


def make(device, seed=0, fused=None, optimizer=torch.optim.Adam):
    torch.manual_seed(seed)
    model = Net().to(device).train()
    kwargs = {"fused": True} if fused else {}
    return model, optimizer(model.parameters(), lr=1e-2, **kwargs)


def state_of(model, optimizer):
    return ([t.detach().clone() for t in model.state_dict().values()],
            [t.clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)])


def assert_same_state(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True):
        assert torch.equal(x, y)


def same_dropout(device):
    """The model and its twin must draw the same dropout masks: the RNG of the device they run
    on (CUDA's own generator on a GPU) is put back after the first of the two forwards."""
    return torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else [])


def loss_of(model, x):
    return model(x).square().mean()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
def test_skipped_step_leaves_model_optimizer_and_batchnorm_as_before(device, fused):
    model, optimizer = make(device, fused=fused)
    guard = nanops.Guard(model, optimizer)
    x = torch.randn(4, 3, 8, 8, device=device)
    loss_of(model, x).backward()
    assert not guard.step().skipped
    before = state_of(model, optimizer)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    loss_of(model, bad).backward()  # moves every BN's running stats to NaN
    result = guard.step()
    assert result.skipped and guard.skipped_steps == 1 and guard.total_steps == 2
    assert_same_state(before, state_of(model, optimizer))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
def test_healthy_steps_match_plain_clip_and_step(device, fused):
    # SGD: Adam would magnify the rounding noise in the (mathematically zero) grads of the
    # conv biases in front of BatchNorm into lr-sized steps.
    model, optimizer = make(device, fused=fused, optimizer=torch.optim.SGD)
    twin, twin_optimizer = make(device, fused=fused, optimizer=torch.optim.SGD)
    guard = nanops.Guard(model, optimizer, max_norm=0.05)
    for i in range(3):
        x = torch.randn(4, 3, 8, 8, device=device, generator=torch.Generator(device).manual_seed(i))
        with same_dropout(device):
            loss_of(model, x).backward()
        loss_of(twin, x).backward()
        result = guard.step()
        norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        twin_optimizer.step()
        twin_optimizer.zero_grad()
        torch.testing.assert_close(result.total_norm, norm, rtol=1e-5, atol=0)
    for p, q in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def host_syncs_counted():
    """Counts reads of tensor values on the host (the ways a step could synchronise)."""
    counts = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist", "cpu", "numpy")}

    def counting(name):
        def read(self, *args, **kwargs):
            counts["n"] += 1
            return originals[name](self, *args, **kwargs)
        return read

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_optimizer_skips_on_the_device_without_reading_any_value(device):
    model, optimizer = make(device, fused=True)
    guard = nanops.Guard(model, optimizer)
    x = torch.randn(4, 3, 8, 8, device=device)
    loss_of(model, x).backward()
    guard.step()  # the first step syncs: the optimizer has no state yet
    before = state_of(model, optimizer)
    bad = x.clone()
    bad[1, 2, 3, 4] = float("nan")
    loss_of(model, bad).backward()
    with host_syncs_counted() as syncs:
        result = guard.step()
    assert syncs["n"] == 0
    assert result.skipped and guard.skipped_steps == 1
    assert_same_state(before, state_of(model, optimizer))
    loss_of(model, x).backward()
    with host_syncs_counted() as syncs:
        result = guard.step()
    assert syncs["n"] == 0 and not result.skipped


@pytest.mark.parametrize("device", DEVICES)
def test_other_optimizers_keep_exactly_one_sync(device):
    model, optimizer = make(device, optimizer=torch.optim.SGD)  # Adam reads its step count itself
    guard = nanops.Guard(model, optimizer)
    loss_of(model, torch.randn(4, 3, 8, 8, device=device)).backward()
    with host_syncs_counted() as syncs:
        result = guard.step()
        assert not result.skipped
    assert syncs["n"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sgd_first_step_skipped_keeps_no_uninitialised_momentum(device):
    torch.manual_seed(0)
    model = Net().to(device)
    twin = Net().to(device)
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    guard = nanops.Guard(model, opt)
    x = torch.randn(4, 3, 8, 8, device=device)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    loss_of(model, bad).backward()
    assert guard.step().skipped and len(opt.state) == 0
    for _ in range(2):
        with same_dropout(device):
            loss_of(model, x).backward()
        loss_of(twin, x).backward()
        guard.step(), twin_opt.step(), twin_opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


# --- locate on replay --------------------------------------------------------------------------


def watched_finding(model, x):
    """Where always-on watch puts the first non-finite value of one step."""
    with nanops.watch(model) as w:
        loss_of(model, x).backward()
        finding = w.check()
    model.zero_grad(set_to_none=True)
    return finding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["forward", "backward", "loss"])
def test_replay_names_the_module_watch_names_and_changes_nothing(device, where):
    model, optimizer = make(device)
    twin, twin_optimizer = make(device)
    x = torch.randn(4, 3, 8, 8, device=device)
    if where == "forward":
        x[0, 0, 4, 4] = float("inf")
    calls = {"n": 0}

    def loss_fn(m, inputs):
        calls["n"] += 1
        loss = loss_of(m, inputs)
        return loss * float("inf") if where == "loss" else loss

    guard, twin_guard = nanops.Guard(model, optimizer), nanops.Guard(twin, twin_optimizer)
    clean = torch.randn(4, 3, 8, 8, device=device)
    torch.manual_seed(5)
    loss_of(model, clean).backward()
    torch.manual_seed(5)
    loss_of(twin, clean).backward()
    guard.step(locate=lambda: loss_fn(model, clean)), twin_guard.step()
    assert calls["n"] == 0  # healthy steps never replay
    if where == "backward":
        model.blow = twin.blow = float("nan")

    expected = None if where == "loss" else watched_finding(twin, x)
    torch.manual_seed(7)
    loss_fn(model, x).backward()
    result = guard.step(locate=lambda: loss_fn(model, x))
    model_next = torch.rand(4, device=device)
    torch.manual_seed(7)
    loss_fn(twin, x).backward()
    twin_result = twin_guard.step()
    twin_next = torch.rand(4, device=device)
    assert result.skipped and twin_result.skipped and calls["n"] == 3  # 2 steps, 1 replay
    assert torch.equal(model_next, twin_next)  # the RNG stream continues as without the replay
    finding = result.finding
    if where == "loss":
        assert (finding.module, finding.phase) == ("loss", "loss")
    else:
        assert expected is not None and expected.phase == where
        assert (finding.module, finding.phase) == (expected.module, expected.phase)
        # block.1 (its BatchNorm) is where block's output tensor is made.
        assert finding.module == ("stem.0" if where == "forward" else "block.1")
    assert guard.findings == [(1, finding)]
    assert_same_state(state_of(twin, twin_optimizer), state_of(model, optimizer))


def test_replay_starts_from_the_steps_rng_state():
    model, optimizer = make("cpu")
    draws = []

    def loss_fn():
        draws.append(torch.rand(3))
        return loss_of(model, x)

    guard = nanops.Guard(model, optimizer)
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    guard.begin()
    loss_fn().backward()
    result = guard.step(locate=loss_fn)
    assert result.skipped and len(draws) == 2
    assert torch.equal(draws[0], draws[1])  # dropout masks too: the replay sees the step's draws
    next_draw = torch.rand(3)
    torch.set_rng_state(guard._rng.cpu)
    assert torch.equal(next_draw, torch.rand(3))


def test_replay_applies_the_amp_loss_scale_of_the_step():
    # The backward overflows float32 only at the step's loss scale (2**16 * 1e38 > 3.4e38).
    model, optimizer = make("cpu")
    model.blow = 1e38
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    guard = nanops.Guard(model, optimizer, scaler)
    x = torch.randn(4, 3, 8, 8)
    scaler.scale(loss_of(model, x)).backward()
    result = guard.step(locate=lambda: loss_of(model, x))
    assert result.skipped
    assert (result.finding.module, result.finding.phase) == ("block.1", "backward")
    assert nanops.locate_step(model, lambda: loss_of(model, x)) is None  # unscaled, it stays finite
    assert scaler.get_scale() == 2.0**15  # backed off as after any overflow


def test_guarded_step_locate_needs_the_model():
    model, optimizer = make("cpu")
    with pytest.raises(ValueError, match="locate needs model="):
        nanops.guarded_step(optimizer, locate=lambda: loss_of(model, torch.randn(1, 3, 4, 4)))


def test_guard_rejects_a_non_module():
    model, optimizer = make("cpu")
    with pytest.raises(TypeError, match="Guard: model must be a torch.nn.Module"):
        nanops.Guard(optimizer, optimizer)


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_replay_on_yolov5_transformer_names_what_watch_names(phase):
    from nanops.yolov5 import build_transformer_model, patch

    torch.manual_seed(0)
    model = build_transformer_model().train()
    patch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    x = torch.randn(1, 3, 64, 64)
    if phase == "forward":
        x[0, 1, 10, 10] = float("inf")  # an overflowed pixel
    else:
        # the C3TR block's output gets a NaN gradient
        model.model[8].register_forward_hook(lambda m, i, out: ExplodeGrad.apply(out, float("nan")))

    def loss():
        return sum(o.float().square().mean() for o in model(x))

    with nanops.watch(model) as w:
        loss().backward()
        expected = w.check()
    guard = nanops.Guard(model, optimizer)
    loss().backward()
    result = guard.step(locate=loss)
    assert result.skipped and expected is not None and expected.phase == phase
    assert (result.finding.module, result.finding.phase) == (expected.module, expected.phase)
    # backward: the C3TR's output tensor is made by its last BatchNorm (the SiLU works in place)
    assert result.finding.module == ("model.0.conv" if phase == "forward" else "model.8.cv3.bn")
