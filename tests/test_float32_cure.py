"""The float16 cure (nanops.training.promote): a promoted module runs in float32 under autocast
for every call style, is carried by a deepcopy (an EMA), saves as its original class, and leaves
no process-wide hook behind."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import nanops
from nanops.training.promote import demote, is_promoted, promote

CPU16 = dict(device_type="cpu", dtype=torch.bfloat16)  # CPU autocast: bfloat16 matmuls


class KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x=None, extra=None):
        out = self.fc(x)
        return out if extra is None else out + extra["bias"]


@dataclasses.dataclass
class Batch:
    img: torch.Tensor


class DataclassBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, batch):
        return self.fc(batch.img)


def _half_input():
    return torch.randn(3, 4).to(torch.bfloat16)


@pytest.mark.parametrize("call", ["positional", "keyword", "dict", "dataclass", "mha-keywords"])
def test_a_promoted_module_runs_in_float32_whatever_its_call_style(call):
    torch.manual_seed(0)
    h = _half_input()
    if call == "mha-keywords":
        module = nn.MultiheadAttention(4, 2)
        run = lambda: module(query=h[:, None], key=h[:, None], value=h[:, None])[0]  # noqa: E731
    elif call == "dataclass":
        module = DataclassBlock()
        run = lambda: module(Batch(img=h))  # noqa: E731
    else:
        module = KeywordBlock()
        run = {"positional": lambda: module(h),
               "keyword": lambda: module(x=h),
               "dict": lambda: module(x=h, extra={"bias": h})}[call]
    with torch.autocast(**CPU16):
        assert run().dtype == torch.bfloat16  # plain autocast
        assert promote(module) and is_promoted(module)
        out = run()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_the_cure_is_carried_by_a_deepcopy_and_saved_as_the_original_class(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), KeywordBlock())
    promote(model[1])
    ema = copy.deepcopy(model)  # yolov5's and ultralytics' EMA
    assert is_promoted(ema[1])
    with torch.autocast(**CPU16):
        assert ema(_half_input()).dtype == torch.float32
    torch.save(model, tmp_path / "m.pt")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "m.pt")
    assert not [n for n in names if "nanops" in n], names
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded[1]) is KeywordBlock


def test_no_process_wide_hook_is_left_and_demote_restores_the_class():
    module = KeywordBlock()
    promote(module)
    registries = [getattr(torch.nn.modules.module, n) for n in ("_global_forward_hooks", "_global_forward_pre_hooks")]
    assert all(len(r) == 0 for r in registries)
    demote(module)
    assert type(module) is KeywordBlock and not is_promoted(module)


def test_a_promoted_attention_inside_a_folded_layer_runs_as_a_module():
    pytest.importorskip("yolov5")
    from nanops.yolov5.shims import import_yolov5_common

    common = import_yolov5_common()
    torch.manual_seed(0)
    layer = common.TransformerLayer(8, 2)
    nanops.patch(layer)
    promote(layer.ma)
    x = torch.randn(40, 2, 8)
    with torch.autocast(**CPU16):
        seen = []
        handle = layer.ma.register_forward_hook(lambda m, a, o: seen.append(o[0].dtype))
        layer(x)
        handle.remove()
    assert seen == [torch.float32]  # the folded path would have skipped the promoted module


class Overflowing(nn.Module):
    """A Linear whose float16 output overflows (x 50000), finite in float32."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) * 50000.0


def _overflowing_model():
    torch.manual_seed(0)
    # LayerNorm runs in float32 under autocast: NaN from an overflowed float16 input only.
    return nn.Sequential(nn.Linear(8, 16), Overflowing(), nn.LayerNorm(16), nn.Linear(16, 4))


FP16 = dict(device_type="cpu", dtype=torch.float16)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_model_compiled_before_the_promotion_runs_the_module_in_float32(fullgraph):
    model = _overflowing_model()
    # aot_eager keeps float16's arithmetic (CPU inductor would compute the product in float32).
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    x = torch.randn(4, 8) * 10
    with torch.autocast(**FP16):
        before = compiled(x)
    assert not torch.isfinite(before).all()
    promote(model[1])
    with torch.autocast(**FP16):
        after = compiled(x)
        eager = model(x)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, eager)
    demote(model[1])
    torch._dynamo.reset()


def test_a_compiled_forward_is_replayed_the_overflow_named_and_cured():
    model = _overflowing_model()
    compiled = torch.compile(model, backend="aot_eager")
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    x = torch.randn(4, 8) * 10

    def loss_fn():
        with torch.autocast(**FP16):
            return compiled(x).float().mean()

    results = []
    with pytest.warns(UserWarning) as said:
        guard = nanops.Guard(compiled, torch.optim.SGD(model.parameters(), lr=1e-3), scaler)
        for _ in range(3):
            scaler.scale(loss_fn()).backward()
            results.append(guard.step(locate=loss_fn))
    said = [str(w.message) for w in said]
    assert sum("headroom monitor is off for this model" in m for m in said) == 1
    assert sum("float16 overflow in the forward of 1" in m for m in said) == 1
    assert [r.skipped for r in results] == [True, False, False]
    assert results[0].finding.module == "1" and results[0].finding.phase == "forward"  # no "_orig_mod."
    assert guard.promoted == ["1"] and is_promoted(model[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch._dynamo.reset()


class InternalOverflow(nn.Module):
    """Overflows float16 inside (x 50000, then a norm over it: inf, so h / inf = 0); its output is
    in [-1, 1] in float32."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x) * 50000.0
        return h / h.norm(dim=-1, keepdim=True)


def test_a_half_validation_copy_runs_the_promoted_module_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), InternalOverflow(), nn.Linear(16, 4))
    x = torch.randn(4, 8)
    reference = model(x)
    plain_half = copy.deepcopy(model).half()
    assert not torch.allclose(plain_half(x.half()).float(), reference, atol=2e-2, rtol=2e-2)
    promote(model[1])
    ema = copy.deepcopy(model).half()  # as yolov5/ultralytics validate their EMA on CUDA
    assert ema[1].lin.weight.dtype == torch.float32 and ema[0].weight.dtype == torch.float16
    out = ema(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
    late = copy.deepcopy(plain_half)  # promoted after it was made half: its weights back to float32
    promote(late[1])
    assert late[1].lin.weight.dtype == torch.float32
    torch.testing.assert_close(late(x.half()).float(), reference, atol=2e-2, rtol=2e-2)


def test_a_promotion_reaches_the_runs_ema():
    model = _overflowing_model()
    ema = copy.deepcopy(model)
    session = nanops.training.Session()
    session.attach(model)
    session.state_objects = lambda: {"model": model, "ema": ema, "optimizer": None}
    assert session.promote(["1", "nowhere"]) == ["1"]
    assert is_promoted(model[1]) and is_promoted(ema[1]) and session.promoted == ["1"]
