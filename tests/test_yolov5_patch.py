import torch

import nanops.nn as nnn
from nanops.yolov5 import build_transformer_model, patch


def test_patch_swaps_the_transformer_layer_and_keeps_outputs():
    model = build_transformer_model().eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        before = model(x)[0]
    params_before = sum(p.numel() for p in model.parameters())
    assert patch(model) == 1
    assert patch(model) == 0  # idempotent
    layers = [m for m in model.modules() if isinstance(m, nnn.TransformerLayer)]
    assert len(layers) == 1 and not layers[0].training
    assert sum(p.numel() for p in model.parameters()) == params_before
    with torch.no_grad():
        after = model(x)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_patch_keeps_dtype_and_any_module_tree():
    model = build_transformer_model().double()
    wrapper = torch.nn.Sequential(torch.nn.Identity(), model)
    assert patch(wrapper) == 1
    layer = next(m for m in wrapper.modules() if isinstance(m, nnn.TransformerLayer))
    assert layer.q.weight.dtype == torch.float64
