import copy

import pytest
import torch

import nanops
from conftest import DEVICES


def net(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 2)).to(device)


def scaler_kwargs(device, amp):
    return dict(device=device, init_scale=2.0**10, growth_interval=2, enabled=amp)


def train_step(model, optimizer, scaler, x, poison=False):
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    if poison:
        model[0].weight.grad[0, 0] = float("nan")
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


def state_of(model, optimizer):
    return copy.deepcopy((model.state_dict(), optimizer.state_dict()))


def assert_same_state(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    for p in opt_a["state"]:
        for k, v in opt_a["state"][p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["state"][p][k])), (p, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [False, True])
def test_finite_steps_match_torch_gradscaler_exactly(device, amp):
    ours, ref = net(device), net(device)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=0.01)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.01)
    scaler_ours = nanops.GradScaler(**scaler_kwargs(device, amp))
    scaler_ref = torch.amp.GradScaler(**scaler_kwargs(device, amp))
    for i in range(5):
        x = torch.randn(4, 6, device=device)
        train_step(ours, opt_ours, scaler_ours, x)
        train_step(ref, opt_ref, scaler_ref, x)
    assert_same_state(state_of(ours, opt_ours), state_of(ref, opt_ref))
    assert scaler_ours.get_scale() == scaler_ref.get_scale()
    assert scaler_ours.state_dict() == scaler_ref.state_dict()
    assert scaler_ours.skipped_steps == 0 and scaler_ours.total_steps == 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [False, True])
def test_nonfinite_step_leaves_model_buffers_and_optimizer_bit_identical(device, amp):
    model = net(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = nanops.GradScaler(**scaler_kwargs(device, amp)).protect(model)
    skipped = []
    scaler.on_skip(lambda: skipped.append(True))
    train_step(model, optimizer, scaler, torch.randn(4, 6, device=device))
    before = state_of(model, optimizer)
    scale_before = scaler.get_scale()
    corrupt = torch.randn(4, 6, device=device)
    corrupt[0, 0] = float("inf")  # its forward writes NaN into the BatchNorm statistics
    train_step(model, optimizer, scaler, corrupt)
    assert scaler.last_step_skipped and skipped == [True] and scaler.skipped_steps == 1
    assert_same_state(state_of(model, optimizer), before)
    assert scaler.get_scale() == (scale_before * 0.5 if amp else scale_before)
    # and training goes on normally from there
    train_step(model, optimizer, scaler, torch.randn(4, 6, device=device))
    assert not scaler.last_step_skipped
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("device", DEVICES)
def test_amp_off_nan_grad_is_skipped_where_torch_steps(device):
    ours, ref = net(device), net(device)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(4, 6, device=device)
    train_step(ours, opt_ours, nanops.GradScaler(device, enabled=False), x, poison=True)
    train_step(ref, opt_ref, torch.amp.GradScaler(device, enabled=False), x, poison=True)
    assert torch.isfinite(ours[0].weight).all()
    assert not torch.isfinite(ref[0].weight).all()  # torch's disabled scaler lets the NaN in


def test_step_without_unscale_checks_too_and_a_second_unscale_is_a_no_op_as_in_torch():
    model = net("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = nanops.GradScaler("cpu", enabled=False)
    model(torch.randn(4, 6)).sum().backward()
    model[3].bias.grad[0] = float("inf")
    weights = copy.deepcopy(model.state_dict())
    scaler.step(optimizer)  # no unscale_: step checks by itself
    assert scaler.last_step_skipped
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    scaler.unscale_(optimizer)
    scaler.unscale_(optimizer)  # torch's disabled scaler accepts it: the same API in both modes
    torch.amp.GradScaler("cpu", enabled=False).unscale_(optimizer)
    scaler.step(optimizer)  # the first unscale_'s record stands: the inf is still there
    assert scaler.last_step_skipped
