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
