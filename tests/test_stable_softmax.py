import pytest
import torch

import nanops
from conftest import DEVICES, FLOAT_DTYPES, rel_error

INF = float("inf")
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference_softmax(x, dim=-1, scale=1.0, mask=None):
    """float64 reference with nanops' documented rules for masked and +inf rows."""
    z = scale * x.double()
    if mask is not None:
        z = z.masked_fill(~mask, -INF) if mask.dtype == torch.bool else z + mask.double()
    z = z.movedim(dim, -1)
    pos_inf = z == INF
    n_inf = pos_inf.sum(-1, keepdim=True)
    y = torch.softmax(z, -1)
    y = torch.where(n_inf > 0, pos_inf.double() / n_inf.clamp(min=1), y)
    all_masked = (z == -INF).all(-1, keepdim=True)
    y = torch.where(all_masked, torch.zeros_like(y), y)
    return y.movedim(-1, dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("length", [1, 7, 400, 1600, 5000])
def test_matches_float64_reference(device, dtype, length):
    x = (3 * torch.randn(6, length, device=device)).to(dtype)
    y = nanops.stable_softmax(x, -1, scale=0.7)
    assert y.dtype == dtype and y.shape == x.shape
    expected = reference_softmax(x, -1, 0.7)
    assert rel_error(y, expected) < TOL[dtype]
    # Not worse than plain torch in the same dtype (FlashAttention's precision rule).
    torch_err = rel_error(torch.softmax(x.float() * 0.7, -1).to(dtype), expected)
    assert rel_error(y, expected) <= 2 * torch_err + TOL[dtype] / 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_any_dim_and_non_contiguous_input(device, dim):
    x = torch.randn(5, 9, 11, device=device, dtype=torch.float64).transpose(0, 2)  # (11, 9, 5), non-contiguous
    assert not x.is_contiguous()
    y = nanops.stable_softmax(x, dim, scale=1.3)
    torch.testing.assert_close(y, torch.softmax(1.3 * x, dim))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mask_shape", [(400, 400), (2, 1, 400, 400), (1, 400), (400, 1), (2, 3, 400, 400)])
def test_masks_of_both_kinds_broadcast(device, dtype, mask_shape):
    x = torch.randn(2, 3, 400, 400, device=device).to(dtype)
    keep = torch.rand(mask_shape, device=device) > 0.3
    additive = torch.where(keep, torch.randn(mask_shape, device=device), torch.full(mask_shape, -INF, device=device))
    for mask in (keep, additive):
        y = nanops.stable_softmax(x, scale=0.125, mask=mask)
        assert rel_error(y, reference_softmax(x, -1, 0.125, mask)) < TOL[dtype]
        assert not y.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_shape", [(401, 401), (1, 401), (401, 1), (2, 1, 401, 401)])
def test_additive_mask_in_x_dtype_is_read_exactly(device, dtype, mask_shape):
    # A 16-bit mask on 16-bit x is read in place and widened in the kernel; widening is exact, so
    # the result must be bitwise the one for the same mask converted to float32 up front.
    x = torch.randn(2, 3, 401, 401, device=device).to(dtype)
    mask = torch.randn(mask_shape, device=device).mul(4).to(dtype)
    mask[..., :3] = -INF
    y = nanops.stable_softmax(x, scale=0.125, mask=mask)
    assert torch.equal(y, nanops.stable_softmax(x, scale=0.125, mask=mask.float()))
    assert rel_error(y, reference_softmax(x, -1, 0.125, mask)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [7, 400, 1600, 5000])
def test_fully_masked_rows_give_zeros_and_zero_grad(device, length):
    x = torch.randn(4, length, device=device, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, length, dtype=torch.bool, device=device)
    mask[1] = False
    y = nanops.stable_softmax(x, mask=mask)
    assert y[1].eq(0).all() and torch.allclose(y[0].sum(), torch.tensor(1.0, dtype=torch.float64, device=device))
    y.backward(torch.randn_like(y))
    assert x.grad[1].eq(0).all() and x.grad[0].abs().sum() > 0
    # All -inf logits behave like a fully masked row.
    all_neg_inf = torch.full((2, length), -INF, device=device)
    assert nanops.stable_softmax(all_neg_inf).eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("length", [7, 400, 5000])
def test_overflowed_logits_never_give_nan(device, dtype, length):
    x = torch.randn(3, length, device=device).to(dtype)
    x[0, 2] = INF             # one +inf: all mass there
    x[1, 1] = INF
    x[1, 5] = INF             # two +inf: half each
    x[2, :] = -INF            # nothing takes part
    y = nanops.stable_softmax(x)
    assert not y.isnan().any()
    assert y[0, 2] == 1 and y[0].sum() == 1
    assert y[1, 1] == 0.5 and y[1, 5] == 0.5 and y[1].sum() == 1
    assert y[2].eq(0).all()
    torch.testing.assert_close(y.double(), reference_softmax(x).to(device))
    # What torch does with the same input, for the record: NaN rows.
    assert torch.softmax(x.float(), -1)[1:].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_huge_finite_logits_stay_finite_in_unit_interval(device):
    x = torch.tensor([[1e10, -1e10, 0.0], [-1e10, -1e10, -1e10], [1e10, 1e10, 1e10 - 1e4]], device=device)
    y = nanops.stable_softmax(x, scale=3.0)
    assert y.isfinite().all() and (y >= 0).all() and (y <= 1).all()
    torch.testing.assert_close(y.double(), reference_softmax(x, -1, 3.0))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_input_row_stays_nan(device):
    x = torch.randn(2, 10, device=device)
    x[0, 3] = float("nan")
    y = nanops.stable_softmax(x)
    assert y[0].isnan().all() and not y[1].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_additive_mask_keeps_float32_meaning(device):
    # -1e9 would round to -inf in float16; the mask is read in float32, so an all -1e9 row is
    # uniform (as torch.softmax in float32 gives), not zeros.
    x = torch.randn(2, 8, device=device, dtype=torch.float16)
    mask = torch.full((2, 8), -1e9, device=device)
    y = nanops.stable_softmax(x, mask=mask)
    torch.testing.assert_close(y.float(), torch.softmax(x.float() + mask, -1), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [7, 1600])
def test_gradcheck_float64(device, length):
    x = torch.randn(3, 2, length, device=device, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, length, device=device) > 0.2
    additive = torch.randn(2, length, device=device, dtype=torch.float64, requires_grad=True)
    fast = length > 1024  # full Jacobians of long rows cost minutes; fast mode checks random projections
    for dim in (-1, 1):
        assert torch.autograd.gradcheck(lambda t: nanops.stable_softmax(t, dim, scale=0.3), (x,), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda t: nanops.stable_softmax(t, scale=0.3, mask=keep), (x,), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda t, m: nanops.stable_softmax(t, scale=0.3, mask=m), (x, additive),
                                    fast_mode=fast)
    small = torch.randn(2, 5, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: nanops.stable_softmax(t, scale=0.5), (small,))


@pytest.mark.parametrize("device", DEVICES)
def test_mask_gradient_alone_and_double_backward_through_the_mask(device):
    # The autograd is C++ (csrc/stable_softmax_autograd.cpp): a broadcast float mask's gradient
    # with x not needing one, and second derivatives through both inputs.
    x = torch.randn(3, 2, 6, device=device, dtype=torch.float64)
    mask = torch.randn(2, 1, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2, 6, device=device, dtype=torch.float64)
    (grad_mask,) = torch.autograd.grad(nanops.stable_softmax(x, scale=0.4, mask=mask), mask, g)
    ref_mask = mask.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.softmax(0.4 * x + ref_mask, -1), ref_mask, g)
    torch.testing.assert_close(grad_mask, expected)
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t, m: nanops.stable_softmax(t, scale=0.4, mask=m), (xg, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_matches_torch(device, dtype):
    x = torch.randn(4, 3, 400, device=device).to(dtype).requires_grad_()
    g = torch.randn(4, 3, 400, device=device).to(dtype)
    (gx,) = torch.autograd.grad(nanops.stable_softmax(x, scale=0.5), x, g)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(torch.softmax(0.5 * x64, -1), x64, g.double())
    assert gx.dtype == dtype
    assert rel_error(gx, ref) < {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 40, device=device, requires_grad=True)
    keep = torch.rand(3, 40, device=device) > 0.5
    additive = torch.randn(1, 40, device=device)
    for args in [(x, -1, 0.5, None), (x, 1, 1.0, None), (x, -1, 0.25, keep), (x, -1, 2.0, additive)]:
        torch.library.opcheck(torch.ops.nanops.stable_softmax.default, args)
    y = torch.softmax(x.detach(), -1)
    torch.library.opcheck(torch.ops.nanops.stable_softmax_backward.default, (torch.randn_like(y), y, -1, 0.5))


def test_bad_arguments_get_clear_errors():
    x = torch.randn(2, 4, 5)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        nanops.stable_softmax(x, mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="more dimensions"):
        nanops.stable_softmax(x, mask=torch.ones(1, 2, 4, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="dtype"):
        nanops.stable_softmax(torch.ones(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="mask has dtype"):
        nanops.stable_softmax(x, mask=torch.ones(5, dtype=torch.int32))
    with pytest.raises(IndexError):
        nanops.stable_softmax(x, dim=3)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    assert nanops.stable_softmax(torch.empty(0, 5, device=device)).shape == (0, 5)
    assert nanops.stable_softmax(torch.empty(3, 0, device=device)).shape == (3, 0)


def test_traces_under_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def attention_probs(q, k, mask):
        return nanops.stable_softmax(q @ k.transpose(-1, -2), scale=0.125, mask=mask)

    q, k = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    mask = torch.rand(16, 16) > 0.5
    torch.testing.assert_close(attention_probs(q, k, mask), nanops.stable_softmax(q @ k.transpose(-1, -2), scale=0.125, mask=mask))
