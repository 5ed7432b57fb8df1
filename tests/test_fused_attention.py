"""The fused attention path (need_weights=False): the stable path's promises through torch's fused
kernels, no L x S tensor, and the backend defects kept out."""
import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nanops
from conftest import DEVICES, HAS_CUDA, rel_error
from nanops.attention import _Logits16
from nanops.fused_attention import fused_attention
from nanops.patching import PatchedMultiheadAttention, PatchedWeightlessAttention
from nanops.yolov5.shims import import_yolov5_common


def reference(q, k, v, mask=None, scale=None):
    """float64 softmax(q·kᵀ·scale + mask)·v with the fused path's rules: a row nothing may attend
    gives 0; a row with +inf mask entries attends those positions only (weighted by their logits)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    z = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            z = z.masked_fill(~mask, -math.inf)
        else:
            m = mask.double().expand_as(z)
            pos = (m == math.inf)
            z = torch.where(pos.any(-1, keepdim=True), torch.where(pos, z, -math.inf), z + m)
    row_max = z.amax(-1, keepdim=True)
    e = torch.exp(z - torch.where(torch.isfinite(row_max), row_max, 0.0))
    total = e.sum(-1, keepdim=True)
    return (e / torch.where(total > 0, total, 1.0)) @ v


def qkv(device, dtype, n=2, h=4, l=24, s=20, e=16, magnitude=1.0, requires_grad=False):
    gen = torch.Generator().manual_seed(3)
    make = lambda length: (torch.randn(n, h, length, e, generator=gen) * magnitude).to(device, dtype)  # noqa: E731
    q, k, v = make(l), make(s), make(s) / magnitude
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def mask_of(kind, device, l=24, s=20, n=2):
    gen = torch.Generator().manual_seed(5)
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(l, s, generator=gen) > 0.3
        m[3] = False  # a row nothing may attend
        return m.to(device)
    if kind == "float":
        m = torch.randn(l, s, generator=gen)
        m[5] = -math.inf
        m[7, 2] = -math.inf
        return m.to(device)
    if kind == "padding":
        m = torch.rand(n, 1, 1, s, generator=gen) > 0.4
        m[1] = False  # a whole batch item padded away
        return m.to(device)
    if kind == "pos_inf":
        m = torch.zeros(l, s)
        m[2, 4] = m[2, 9] = math.inf
        return m.to(device)
    raise ValueError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", [None, "bool", "float", "padding", "pos_inf"])
def test_matches_float64_reference_with_dead_rows_zero(device, dtype, kind):
    q, k, v = qkv(device, dtype, requires_grad=True)
    mask = mask_of(kind, device)
    out = fused_attention(q, k, v, mask, scale=0.25)
    assert out is not None, "a fused backend should take this call"
    ref = reference(q, k, v, mask, scale=0.25)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_error(out, ref) < TOL[dtype]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = torch.randn_like(ref)
    expected = torch.autograd.grad(reference(q64, k64, v64, mask, scale=0.25), (q64, k64, v64), g)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        assert rel_error(a, b) < 20 * TOL[dtype]
    if kind == "bool":  # row 3: zero output, zero gradient into q
        assert (out[:, :, 3] == 0).all() and (got[0][:, :, 3] == 0).all()
    if kind == "padding":
        assert (out[1] == 0).all() and (got[0][1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_logits_far_above_65504_stay_finite(device, dtype):
    q, k, v = qkv(device, dtype, magnitude=100.0)
    logits = q.double() @ k.double().transpose(-1, -2)
    assert logits.abs().max() > 1e5  # a 16-bit q.k would overflow float16
    out = fused_attention(q, k, v, scale=1.0)
    assert torch.isfinite(out).all()
    assert rel_error(out, reference(q, k, v, scale=1.0)) < TOL[dtype]


def test_dropout_on_cpu_is_left_to_the_stable_path():
    q, k, v = qkv("cpu", torch.float32)
    assert fused_attention(q, k, v, scale=0.25, dropout_p=0.1) is None  # only math would take it
    mha = nanops.nn.MultiheadAttention(16, 4, dropout=0.5).train()
    x = torch.randn(9, 2, 16)
    out, weights = mha(x, x, x, need_weights=False)
    assert torch.isfinite(out).all() and weights is None


class ShapeLog(TorchDispatchMode):
    """Every tensor shape that reaches or leaves an operator, and each call's output shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        if isinstance(out, torch.Tensor):
            self.calls.append((str(func), tuple(out.shape)))
        return out


def square(shapes, length):
    return [(f, s) for f, s in shapes if len(s) >= 2 and s[-1] == length and s[-2] == length]


def test_no_l_by_l_tensor_reaches_an_operator():
    length, c = 37, 32
    common = import_yolov5_common()
    yolo = common.TransformerLayer(c, 4)
    nanops.patch(yolo)
    assert isinstance(yolo.ma, PatchedWeightlessAttention)
    for layer in (yolo, nanops.nn.TransformerLayer(c, 4)):
        x = torch.randn(length, 2, c, requires_grad=True)
        with ShapeLog() as log:
            layer(x).square().sum().backward()
        assert log.shapes and not square(log.shapes, length), square(log.shapes, length)[:3]
    # the need_weights=True path forms them, as it must: the check above can see them
    mha = nanops.nn.MultiheadAttention(c, 4)
    x = torch.randn(length, 2, c)
    with ShapeLog() as log:
        mha(x, x, x, need_weights=True)
    assert square(log.shapes, length)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "padding"])
def test_need_weights_false_equals_the_stable_path_with_masks(mask_kind):
    torch.manual_seed(0)
    mha = nanops.nn.MultiheadAttention(16, 4).double()
    x = torch.randn(11, 3, 16, dtype=torch.double, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    if mask_kind == "bool":
        kwargs = {"attn_mask": torch.rand(11, 11, generator=gen) > 0.6}
        kwargs["attn_mask"][4] = True  # row 4 may attend nothing (True = not allowed in MHA)
    elif mask_kind == "float":
        m = torch.randn(11, 11, generator=gen, dtype=torch.double)
        m[2] = -math.inf
        kwargs = {"attn_mask": m}
    else:
        pad = torch.rand(3, 11, generator=gen) > 0.5
        pad[0] = True  # every key of item 0 padded
        kwargs = {"key_padding_mask": pad}
    fused, _ = mha(x, x, x, need_weights=False, **kwargs)
    stable, _ = mha(x, x, x, need_weights=True, **kwargs)
    torch.testing.assert_close(fused, stable, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(fused)
    gf = torch.autograd.grad(fused, [x, *mha.parameters()], g)
    gs = torch.autograd.grad(stable, [x, *mha.parameters()], g)
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if mask_kind == "padding":  # item 0: output is out_proj's bias, zero gradient into x
        torch.testing.assert_close(fused[:, 0], mha.out_proj.bias.expand(11, 16))


def test_patched_yolov5_layer_under_cpu_float16_autocast_is_finite_where_yolov5_is_not():
    common = import_yolov5_common()
    torch.manual_seed(0)
    plain = common.TransformerLayer(64, 4)
    ours = common.TransformerLayer(64, 4)
    ours.load_state_dict(plain.state_dict())
    nanops.patch(ours)
    x = torch.randn(50, 2, 64) * 1000  # q.k far beyond float16's range
    with torch.autocast("cpu", dtype=torch.float16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert not torch.isfinite(plain(x)).all()
        out = ours(x)
    assert torch.isfinite(out).all()
    # The same float16 projections through the stable path (float32 logits, stable_softmax).
    ours.ma.__class__ = PatchedMultiheadAttention
    with torch.autocast("cpu", dtype=torch.float16):
        stable = ours(x)
    assert rel_error(out, stable) < 5e-3
    with torch.no_grad():  # and float64 throughout, within float16's rounding of q.k near 1e5
        assert rel_error(out, ours.double()(x.double())) < 5e-2


def test_patch_keeps_the_weights_path_where_a_parent_uses_them():
    class UsesWeights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2)

        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return out, weights

    model = UsesWeights()
    nanops.patch(model)
    assert not isinstance(model.attn, PatchedWeightlessAttention)
    out, weights = model(torch.randn(5, 1, 8))
    assert weights.shape == (1, 5, 5)


def test_compiled_layer_runs_fused_and_matches_eager():
    torch._dynamo.reset()
    layer = nanops.nn.TransformerLayer(32, 4)
    x = torch.randn(20, 2, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_16bit_logits_gemm_backward_matches_float64():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 7, 8, generator=gen).half().requires_grad_()
    k = torch.randn(3, 9, 8, generator=gen).half().requires_grad_()
    logits = _Logits16.apply(q, k)
    assert logits.dtype == torch.float32
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    ref = q64 @ k64.transpose(1, 2)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(3, 7, 9, generator=gen)
    for a, b in zip(torch.autograd.grad(logits, (q, k), g), torch.autograd.grad(ref, (q64, k64), g.double())):
        assert a.dtype == torch.float16 and rel_error(a, b) < 2e-3


# ------------------------------------------------------------------------------------------
# CUDA: the backend defects of torch 2.11 on an H100 that must not leak through
# ------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none on this machine)")


@needs_cuda
@pytest.mark.parametrize("length", [1600, 192])  # L % 128 == 64: cuDNN's NaN grad_q with a mask
def test_cuda_masked_backward_finite_at_l_mod_128_eq_64(length):
    torch.manual_seed(0)
    mha = nanops.nn.MultiheadAttention(64, 4).cuda().half()
    x = torch.randn(length, 2, 64, device="cuda", dtype=torch.half, requires_grad=True)
    mask = torch.rand(length, length, device="cuda") > 0.9  # True = not allowed
    out, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    ref, _ = mha.float()(x.float(), x.float(), x.float(), attn_mask=mask, need_weights=True)
    assert rel_error(out, ref) < 5e-3


@needs_cuda
def test_cuda_float32_mask_with_float16_queries_under_autocast():
    torch.manual_seed(0)
    mha = nanops.nn.MultiheadAttention(64, 4).cuda()
    x = torch.randn(400, 2, 64, device="cuda")
    mask = torch.randn(400, 400, device="cuda")  # float32, added
    with torch.autocast("cuda", dtype=torch.float16):
        out, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    ref, _ = mha(x, x, x, attn_mask=mask, need_weights=True)
    assert torch.isfinite(out).all() and rel_error(out, ref) < 5e-3


@needs_cuda
def test_cuda_16bit_gemm_logits_match_float64():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 70, 64, device="cuda", generator=gen).half().mul(40).requires_grad_()
    k = torch.randn(3, 90, 64, device="cuda", generator=gen).half().mul(40).requires_grad_()
    logits = _Logits16.apply(q, k)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all() and logits.abs().max() > 65504
    torch.testing.assert_close(logits.double(), q.double() @ k.double().transpose(1, 2), rtol=1e-5, atol=1e-2)
    logits.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


# ------------------------------------------------------------------------------------------
# The folded TransformerLayer (nanops.transformer_layer)
# ------------------------------------------------------------------------------------------

def _yolo_pair(c=32, heads=4, dtype=torch.float64):
    common = import_yolov5_common()
    torch.manual_seed(1)
    ref = common.TransformerLayer(c, heads).to(dtype)
    ours = common.TransformerLayer(c, heads).to(dtype)
    ours.load_state_dict(ref.state_dict())
    nanops.patch(ours)
    return ref, ours


def test_folded_layer_matches_yolov5_outputs_and_every_gradient():
    ref, ours = _yolo_pair()
    assert type(ours).__name__ == "PatchedTransformerLayer"
    x = torch.randn(40, 3, 32, dtype=torch.float64, requires_grad=True)
    out_ref, out = ref(x), ours(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *ours.parameters()], g),
                    torch.autograd.grad(out_ref, [x, *ref.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _token_gemms(layer, x) -> int:
    tokens = x.shape[0] * x.shape[1]
    with ShapeLog() as log:
        layer(x)
    return sum(1 for f, shape in log.calls if f.split(".")[1] in ("mm", "addmm") and shape[0] == tokens)


def test_folded_layer_runs_three_token_gemms_where_yolov5_runs_nine():
    ref, ours = _yolo_pair(c=32)
    x = torch.randn(40, 3, 32, dtype=torch.float64)
    assert _token_gemms(ref, x) == 9
    assert _token_gemms(ours, x) == 3


def test_a_hook_on_a_projection_sees_it_called():
    ref, ours = _yolo_pair()
    seen = []
    handle = ours.q.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x = torch.randn(40, 3, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-12)
    handle.remove()
    assert seen == [(40, 3, 32)]


def test_few_tokens_run_module_by_module_and_unpatch_restores():
    ref, ours = _yolo_pair()
    x = torch.randn(3, 2, 32, dtype=torch.float64)  # 6 tokens < 2 * C: folding would cost more
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-12)
    nanops.unpatch(ours)
    assert type(ours) is type(ref) and type(ours.ma) is torch.nn.MultiheadAttention


def test_folded_layer_pickles_as_yolov5s():
    import io

    _, ours = _yolo_pair()
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    assert b"nanops" not in buffer.getvalue()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__module__.startswith("yolov5") and type(loaded.ma) is torch.nn.MultiheadAttention


def test_folded_layer_under_float16_autocast_matches_the_stable_path():
    ref, ours = _yolo_pair(c=64, dtype=torch.float32)
    x = torch.randn(50, 2, 64) * 1000
    with torch.autocast("cpu", dtype=torch.float16):
        folded = ours(x)
        ours.q.register_forward_hook(lambda *a: None)  # hooks present: module by module
        plain_order = ours(x)
    assert torch.isfinite(folded).all() and torch.isfinite(plain_order).all()
    assert rel_error(folded, plain_order) < 2e-2
