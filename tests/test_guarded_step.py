import pytest
import torch

import nanops
from conftest import DEVICES


def tiny_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(device)


def backward(model, x):
    model(x).square().mean().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_amp_off_nan_grad_never_reaches_weights_or_optimizer_state(device):
    model = tiny_model(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    backward(model, torch.randn(4, 8, device=device))
    assert not nanops.guarded_step(opt).skipped
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    backward(model, torch.randn(4, 8, device=device))
    model[0].weight.grad[0, 0] = float("nan")
    result = nanops.guarded_step(opt)
    assert result.skipped and not torch.isfinite(result.total_norm)
    for p, w, s in zip(model.parameters(), weights, state):
        assert torch.equal(p, w)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v)
        assert p.grad is None or p.grad.abs().sum() == 0  # zero_grad ran


@pytest.mark.parametrize("device", DEVICES)
def test_amp_off_finite_step_clips_like_yolov5(device):
    model, twin = tiny_model(device), tiny_model(device)
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    x = torch.randn(4, 8, device=device) * 100
    backward(model, x)
    backward(twin, x)
    result = nanops.guarded_step(opt, max_norm=1.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm=1.0)
    twin_opt.step()
    assert not result.skipped
    torch.testing.assert_close(result.total_norm, expected_norm, rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("device", DEVICES)
def test_amp_on_matches_gradscaler_sequence_and_skips_overflow(device):
    model, twin = tiny_model(device), tiny_model(device)
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    scaler, twin_scaler = torch.amp.GradScaler(device, init_scale=1024.0), torch.amp.GradScaler(device, init_scale=1024.0)
    x = torch.randn(4, 8, device=device)
    scaler.scale(model(x).square().mean()).backward()
    twin_scaler.scale(twin(x).square().mean()).backward()
    result = nanops.guarded_step(opt, scaler, max_norm=0.1)
    twin_scaler.unscale_(twin_opt)
    expected_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm=0.1)
    twin_scaler.step(twin_opt)
    twin_scaler.update()
    assert not result.skipped
    torch.testing.assert_close(result.total_norm, expected_norm, rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    assert scaler.get_scale() == twin_scaler.get_scale()
    # An overflowing step: weights untouched, the scale backs off as GradScaler's would.
    weights = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x).square().mean()).backward()
    model[2].bias.grad[0] = float("inf")
    result = nanops.guarded_step(opt, scaler)
    assert result.skipped
    assert scaler.get_scale() == 512.0
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
