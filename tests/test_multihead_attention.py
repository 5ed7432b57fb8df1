import itertools
import warnings

import pytest
import torch

import nanops
from nanops.nn import MultiheadAttention

E, H, L, S, N = 16, 4, 5, 7, 3


def pair(**options):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, **options).double()
    ours = MultiheadAttention(E, H, **options).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


def masks(kind):
    gen = torch.Generator().manual_seed(1)
    bool_attn = torch.rand(L, S, generator=gen) > 0.7
    bool_pad = torch.rand(N, S, generator=gen) > 0.8
    float_attn = torch.randn(L, S, generator=gen, dtype=torch.double)
    return {
        "none": {},
        "bool_attn": {"attn_mask": bool_attn},
        "bool_pad": {"key_padding_mask": bool_pad},
        "bool_both": {"attn_mask": bool_attn, "key_padding_mask": bool_pad},
        "float_attn": {"attn_mask": float_attn},
        "float_3d": {"attn_mask": torch.randn(N * H, L, S, generator=gen, dtype=torch.double)},
        "float_pad": {"key_padding_mask": torch.randn(N, S, generator=gen, dtype=torch.double)},
        "mixed": {"attn_mask": float_attn, "key_padding_mask": bool_pad},
    }[kind]


@pytest.mark.parametrize(
    "batch_first,kdim,extra,mask_kind,need_weights,average",
    [(bf, kd, ex, mk, nw, avg) for bf, kd, ex, mk, (nw, avg) in itertools.product(
        [False, True], [None, 12], ["plain", "bias_kv_zero_attn"],
        ["none", "bool_attn", "bool_pad", "bool_both", "float_attn", "float_3d", "float_pad", "mixed"],
        [(True, True), (True, False), (False, True)])],
)
def test_forward_and_backward_match_torch(batch_first, kdim, extra, mask_kind, need_weights, average):
    options = dict(batch_first=batch_first, kdim=kdim, vdim=kdim)
    if extra == "bias_kv_zero_attn":
        options.update(add_bias_kv=True, add_zero_attn=True)
    ref, ours = pair(**options)
    kv_dim = kdim or E
    q = torch.randn((N, L, E) if batch_first else (L, N, E), dtype=torch.double, requires_grad=True)
    k = torch.randn((N, S, kv_dim) if batch_first else (S, N, kv_dim), dtype=torch.double, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    kwargs = dict(masks(mask_kind), need_weights=need_weights, average_attn_weights=average)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation note on mixed mask types
        out_ref, w_ref = ref(q, k, v, **kwargs)
        out, w = ours(q, k, v, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    else:
        assert w is None and w_ref is None
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad(out_ref, [q, k, v, *ref.parameters()], g)
    grads = torch.autograd.grad(out, [q, k, v, *ours.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_unbatched_and_float32_match_torch():
    ref, ours = pair()
    ref.float(), ours.float()
    x = torch.randn(L, E)
    out_ref, w_ref = ref(x, x, x)
    out, w = ours(x, x, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_is_causal_needs_a_mask_as_in_torch():
    ref, ours = pair()
    x = torch.randn(L, N, E, dtype=torch.double)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.double)
    torch.testing.assert_close(ours(x, x, x, attn_mask=causal, is_causal=True)[0],
                               ref(x, x, x, attn_mask=causal, is_causal=True)[0])
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        ours(x, x, x, is_causal=True)


def test_float16_overflow_and_fully_masked_rows_finite_where_torch_is_nan():
    ref, ours = pair()
    with torch.no_grad():
        for m in (ref, ours):
            m.in_proj_weight.mul_(300)
    ref.half(), ours.half()
    x = torch.randn(L, N, E).half()
    assert ref(x, x, x)[0].isnan().any()
    assert ours(x, x, x)[0].isfinite().all()
    ref.double(), ours.double()
    y = torch.randn(L, N, E, dtype=torch.double)
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[1] = True  # every key of batch item 1 masked
    z = torch.randn(S, N, E, dtype=torch.double)
    out_ref, w_ref = ref(y, z, z, key_padding_mask=pad)
    out, w = ours(y, z, z, key_padding_mask=pad)
    assert out_ref[:, 1].isnan().all() and w_ref[1].isnan().all()
    assert out.isfinite().all() and (w[1] == 0).all()
    torch.testing.assert_close(out[:, [0, 2]], out_ref[:, [0, 2]])


def test_integer_masks_are_rejected_as_torch_rejects_them():
    _, ours = pair()
    x = torch.randn(L, N, E, dtype=torch.double)
    with pytest.raises(AssertionError, match="only bool and floating types of attn_mask are supported"):
        ours(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.uint8))


def test_patch_any_model_keeps_parameters_and_unpatch_restores_torch():
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0),
                                        num_layers=2, enable_nested_tensor=False).train()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(L, N, E)
    expected = model(x)
    assert nanops.patch(model) == 2
    assert all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    before = model.layers[0].self_attn.in_proj_weight.detach().clone()
    model(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.layers[0].self_attn.in_proj_weight, before)
    assert nanops.unpatch(model) == 2
    assert all(type(layer.self_attn) is torch.nn.MultiheadAttention for layer in model.layers)


def test_gradcheck_float64():
    _, ours = pair()
    q = torch.randn(3, 2, E, dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[False, False, True], [False, True, True], [True, True, True]])
    assert torch.autograd.gradcheck(lambda t: ours(t, t, t, attn_mask=mask)[0], (q,))


def test_patch_reaches_ultralytics_aifi_batch_first():
    from ultralytics.nn.modules.transformer import AIFI

    torch.manual_seed(0)
    layer = AIFI(32, cm=64, num_heads=4, dropout=0.0).eval()
    x = torch.randn(2, 32, 5, 6)
    expected = layer(x)
    assert nanops.patch(layer) == 1 and layer.ma.batch_first
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


class _SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ma = torch.nn.MultiheadAttention(E, H)

    def forward(self, x):
        return self.ma(x, x, x, key_padding_mask=torch.zeros(x.shape[1], x.shape[0], dtype=torch.bool))[0]


def test_torch_export_of_a_patched_model_is_standard_ops():
    torch.manual_seed(0)
    model = _SelfAttention().eval()
    nanops.patch(model)
    x = torch.randn(L, N, E)
    exported = torch.export.export(model, (x,))
    assert "nanops" not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.filterwarnings("ignore")  # the ONNX exporter's own notes
def test_onnx_export_of_a_patched_model_uses_only_standard_onnx_ops(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _SelfAttention().eval()
    nanops.patch(model)
    path = tmp_path / "attention.onnx"
    torch.onnx.export(model, (torch.randn(L, N, E),), str(path), dynamo=True)
    assert {node.domain for node in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}
