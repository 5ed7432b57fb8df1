import pytest
import torch

import nanops


class NanAt(torch.nn.Module):
    """Identity that turns its input into NaN in forward, or its gradient in backward."""

    def __init__(self, phase=None):
        super().__init__()
        self.phase = phase

    def forward(self, x):
        if self.phase == "forward":
            return x * float("nan")
        if self.phase == "backward":
            return _NanGrad.apply(x)
        return x


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def model_with(phase, where):
    layers = [torch.nn.Linear(4, 4), NanAt(phase if where == 1 else None), torch.nn.Linear(4, 4),
              NanAt(phase if where == 3 else None), torch.nn.Linear(4, 1)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("where", [1, 3])
def test_names_first_module_in_forward(where):
    model = model_with("forward", where)
    with nanops.watch(model) as w:
        model(torch.randn(2, 4)).sum().backward()
        finding = w.check()
    assert finding.module == str(where) and finding.phase == "forward" and finding.nan > 0


@pytest.mark.parametrize("where", [1, 3])
def test_names_first_module_in_backward(where):
    model = model_with("backward", where)
    with nanops.watch(model) as w:
        out = model(torch.randn(2, 4)).sum()
        assert w.check() is None  # forward was clean
        out.backward()
        finding = w.check()
    # The gradient w.r.t. the output of the module before the NaN-making one is the first to go bad.
    assert finding.phase == "backward" and finding.module == str(where - 1)


def test_clean_steps_report_nothing_and_hooks_are_removed():
    model = model_with(None, 0)
    w = nanops.watch(model)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        assert w.check() is None
    assert w.step == 3 and w.first is None
    w.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_finds_injected_nan_in_yolov5_transformer_model():
    from nanops.yolov5 import build_transformer_model

    model = build_transformer_model()
    x = torch.randn(1, 3, 64, 64)
    with nanops.watch(model) as w:
        with torch.no_grad():
            model.model[8].cv1.conv.weight[0, 0, 0, 0] = float("nan")
        model(x)
        finding = w.check()
    assert finding.module == "model.8.cv1.conv" and finding.phase == "forward"


def test_watched_model_deep_copies_and_saves():
    import copy
    import io

    model = model_with(None, 0)
    with nanops.watch(model) as w:
        model(torch.randn(2, 4)).sum().backward()
        twin = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)  # yolov5's checkpoint save pickles the whole model
        assert w.check() is None
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(torch.ones(1, 4)), twin(torch.ones(1, 4)))


def test_locate_forward_names_the_module_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), NanAt("forward"),
                                torch.nn.Linear(4, 1)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4)
    rng = torch.get_rng_state()
    finding = nanops.locate_forward(model, x)
    assert finding.module == "2" and finding.phase == "forward"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm stats included
    assert torch.equal(torch.get_rng_state(), rng)
    assert nanops.locate_forward(model_with(None, 0), torch.randn(3, 4)) is None


def test_nan_inside_a_dataclass_output_is_found():
    from dataclasses import dataclass

    @dataclass
    class Out:
        boxes: torch.Tensor
        scores: torch.Tensor

    class Head(torch.nn.Module):
        def forward(self, x):
            return Out(boxes=x, scores=x * float("nan"))

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Head())
    with nanops.watch(model, backward=False) as w:
        model(torch.randn(2, 4))
        finding = w.check()
    assert finding.module == "1" and finding.nan == 8


def test_records_stay_bounded_without_check(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["nanops.training.watch"], "MAX_PENDING_RECORDS", 10)  # nanops.watch is the function
    model = model_with("forward", 3)
    with nanops.watch(model, backward=False) as w:
        for _ in range(20):
            model(torch.randn(2, 4))
            assert len(w._records) < 10
        finding = w.check()
    assert finding.module == "3" and finding.phase == "forward"


def test_watch_rejects_a_non_module():
    with pytest.raises(TypeError, match="watch: model must be a torch.nn.Module"):
        nanops.watch(None)


@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("where", [1, 3])
def test_deferred_check_finds_what_the_per_module_check_finds(phase, where):
    findings = []
    for defer in (False, True):
        model = model_with(phase, where)
        with nanops.watch(model, defer=defer) as w:
            model(torch.randn(2, 4)).sum().backward()
            findings.append(w.check())
            model(torch.randn(2, 4))
            collected, checked = (w._deferred, w._records) if defer else (w._records, w._deferred)
            assert len(collected) == 4 and not checked  # the identity NanAt shares its input: one record
    # backward: the NaN gradient leaves NanAt into the output of the module before it
    assert findings[0] == findings[1] and findings[0].phase == phase
    assert findings[0].module == str(where if phase == "forward" else where - 1)


def test_deferred_tensors_past_the_byte_budget_are_checked_early():
    model = model_with("forward", 3)
    with nanops.watch(model, defer=True, max_deferred_bytes=40) as w:  # two (2, 4) float outputs
        model(torch.randn(2, 4))
        assert w._deferred_bytes <= 40 and len(w._records) == 2  # checked early: "0" and "2"
        finding = w.check()
    assert finding.module == "3" and finding.nan == 8
    with pytest.raises(ValueError, match="max_deferred_bytes must be >= 0"):
        nanops.watch(model, max_deferred_bytes=-1)
