import math

import pytest
import torch

import nanops.nn as nnn
from conftest import DEVICES
from nanops.yolov5.shims import import_yolov5_common

common = import_yolov5_common()


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_layer_state_dict_and_output_parity(device):
    ref = common.TransformerLayer(256, 4).to(device)
    ours = nnn.TransformerLayer(256, 4).to(device)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(400, 2, 256, device=device, requires_grad=True)
    y_ref, y = ref(x), ours(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)


def test_block_and_c3tr_load_yolov5_weights_strictly():
    for ref, ours, x in [
        (common.TransformerBlock(64, 128, 4, 2), nnn.TransformerBlock(64, 128, 4, 2), torch.randn(2, 64, 8, 8)),
        (common.C3TR(128, 256, n=1), nnn.C3TR(128, 256, n=1), torch.randn(2, 128, 10, 10)),
    ]:
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
        ref.eval(), ours.eval()
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_float16_logit_overflow_stays_finite_where_yolov5_gives_nan():
    # A float16 model (yolov5 --half): q.k beyond 65504 is inf in yolov5's float16 baddbmm and
    # its softmax returns NaN; nanops computes the logits in float32.
    torch.manual_seed(0)
    ref = common.TransformerLayer(32, 4)
    ours = nnn.TransformerLayer(32, 4)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for layer in (ref, ours):
            layer.q.weight.mul_(1000)
            layer.k.weight.mul_(1000)
    x = torch.randn(10, 2, 32)
    expected = ref(x)
    assert expected.isfinite().all()  # float32 itself is fine
    ref.half(), ours.half()
    assert ref(x.half()).isnan().any()
    y = ours(x.half())
    assert y.isfinite().all()
    assert (y.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_masks_reach_the_attention_and_match_yolov5_layer():
    ref = common.TransformerLayer(32, 4).eval()
    ours = nnn.TransformerLayer(32, 4).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 2, 32)
    pad = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    for attn_mask, kpm in [(None, pad), (causal, None), (causal, pad)]:
        xa = ref.ma(ref.q(x), ref.k(x), ref.v(x), attn_mask=attn_mask, key_padding_mask=kpm)[0] + x
        expected = ref.fc2(ref.fc1(xa)) + xa
        torch.testing.assert_close(ours(x, attn_mask=attn_mask, key_padding_mask=kpm), expected, rtol=1e-5, atol=1e-5)


def test_unbatched_input_as_yolov5():
    ref = common.TransformerLayer(16, 2)
    ours = nnn.TransformerLayer(16, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_fully_masked_query_gives_zeros_not_nan():
    layer = nnn.TransformerLayer(32, 4)
    x = torch.randn(5, 1, 32)
    pad = torch.ones(1, 5, dtype=torch.bool)  # every key padded
    assert layer(x, key_padding_mask=pad).isfinite().all()
    assert torch.nn.MultiheadAttention.forward(layer.ma, x, x, x, key_padding_mask=pad)[0].isnan().all()  # torch


def test_integer_masks_are_rejected_as_multihead_attention_does():
    layer = nnn.TransformerLayer(8, 2)
    x = torch.randn(3, 1, 8)
    for bad in (torch.zeros(3, 3, dtype=torch.uint8), torch.zeros(3, 3, dtype=torch.int64)):
        with pytest.raises(AssertionError, match="only bool and floating types of attn_mask"):
            layer(x, attn_mask=bad)
    with pytest.raises(AssertionError, match="only bool and floating types of key_padding_mask"):
        layer(x, key_padding_mask=torch.zeros(1, 3, dtype=torch.int32))


def test_wrong_mask_shape_gets_multihead_attentions_message():
    layer = nnn.TransformerLayer(8, 2)
    x = torch.randn(3, 1, 8)
    with pytest.raises(RuntimeError, match=r"The shape of the 2D attn_mask is torch.Size\(\[3, 4\]\), but should be "):
        layer(x, attn_mask=torch.zeros(3, 4, dtype=torch.bool))


def test_autocast_logits_are_float32():
    layer = nnn.TransformerLayer(64, 4)
    x = torch.randn(50, 2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.isfinite().all()
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


def test_gradcheck_layer_float64():
    layer = nnn.TransformerLayer(8, 2).double()
    x = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert math.isfinite(layer(x).sum().item())
