import copy
import io

import pytest
import torch

import nanops
from nanops.patching import PatchedWeightlessAttention
from nanops.yolov5 import build_transformer_model, patch, unpatch


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]


def test_import_nanops_reaches_the_submodules():
    assert nanops.yolov5.patch is patch and nanops.nn.TransformerLayer is not None


def test_patch_switches_the_attention_in_place_and_keeps_outputs():
    model = build_transformer_model().eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        before = model(x)[0]
    params_before = list(model.parameters())
    layer = next(m for m in model.modules() if type(m).__name__ == "TransformerLayer")
    assert patch(model) == 1
    assert patch(model) == 0  # idempotent
    # yolov5's layer keeps only [0] of the attention's result: the fused, weightless variant
    assert type(layer.ma) is PatchedWeightlessAttention
    # the layer runs nanops' folded forward, and is still yolov5's class (a subclass of it)
    assert type(layer).__name__ == "PatchedTransformerLayer" and layer._original_class.__module__.startswith("yolov5")
    assert isinstance(layer, layer._original_class)
    assert all(a is b for a, b in zip(model.parameters(), params_before))  # the same Parameter objects
    assert not layer.ma.training
    with torch.no_grad():
        after = model(x)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert unpatch(model) == 1 and type(layer.ma) is torch.nn.MultiheadAttention


def test_patch_keeps_dtype_and_any_module_tree():
    model = build_transformer_model().double()
    wrapper = torch.nn.Sequential(torch.nn.Identity(), model)
    assert patch(wrapper) == 1
    (mha,) = _attention_modules(wrapper)
    assert mha.in_proj_weight.dtype == torch.float64


def test_patch_after_the_optimizer_exists_still_trains_the_transformer():
    model = build_transformer_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # as yolov5 builds it, before any user hook
    patch(model)
    (mha,) = _attention_modules(model)
    before = mha.in_proj_weight.detach().clone()
    sum(o.float().square().mean() for o in model(torch.randn(1, 3, 64, 64))).backward()
    optimizer.step()
    assert not torch.equal(mha.in_proj_weight, before)


def test_patched_checkpoint_is_plain_and_no_larger():
    model = build_transformer_model()
    plain = io.BytesIO()
    torch.save(model, plain)
    patch(model)
    patched = io.BytesIO()
    torch.save(model, patched)
    # The same tensors and modules: only the reconstructor's name (about 64 bytes per patched
    # attention) differs, where copying the old layer's bound methods used to add 2.4 MB.
    assert len(patched.getvalue()) <= len(plain.getvalue()) + 256
    assert b"nanops" not in patched.getvalue()
    patched.seek(0)
    loaded = torch.load(patched, weights_only=False)
    assert type(_attention_modules(loaded)[0]) is torch.nn.MultiheadAttention
    # deepcopy (EMA) stays patched; no bound method of anything old is carried along.
    twin = copy.deepcopy(model)
    assert type(_attention_modules(twin)[0]) is PatchedWeightlessAttention
    twin.double()
    assert next(model.parameters()).dtype == torch.float32


# torch.jit's own deprecation notes, and shape reads that tracing records as constants.
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_patched_model_needs_no_nanops_op():
    model = build_transformer_model().eval()
    patch(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, strict=False, check_trace=False)
        expected = model(x)[0]
    assert "nanops::" not in str(traced.inlined_graph)  # source comments name files, ops would be nanops::
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x)[0], expected, rtol=1e-4, atol=1e-4)
