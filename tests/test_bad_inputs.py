"""Bad inputs get clear errors naming the argument, never silent wrong answers (and torch's
answers where torch has one)."""
import math

import numpy as np
import pytest
import torch

import nanops


def params(*grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        out.append(p)
    return out


# --- meta-device arguments beside real data --------------------------------------------------

def test_meta_found_inf_is_rejected_and_grads_untouched():
    ps = params(torch.ones(3) * 10, torch.ones(2))
    with pytest.raises(ValueError, match="found_inf is on meta but the gradients are on cpu"):
        nanops.clip_grad_norm_(ps, 1.0, found_inf=torch.zeros(1, device="meta"))
    assert torch.equal(ps[0].grad, torch.ones(3) * 10)


def test_meta_inv_scale_is_rejected():
    with pytest.raises(ValueError, match="inv_scale is on meta"):
        nanops.clip_grad_norm_(params(torch.ones(3)), 1.0, inv_scale=torch.ones(1, device="meta"))


def test_meta_mask_is_rejected_by_wrapper_and_by_the_raw_op():
    x = torch.randn(2, 3)
    meta_mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask is on meta but x is on cpu"):
        nanops.stable_softmax(x, mask=meta_mask)
    with pytest.raises(ValueError, match="mask is on meta but the data is on cpu"):
        torch.ops.nanops.stable_softmax(x, -1, 1.0, meta_mask)


def test_meta_coef_is_rejected_by_the_raw_scale_op():
    with pytest.raises(ValueError, match="coef is on meta"):
        torch.ops.nanops.scale_tensors_([torch.ones(3)], torch.ones((), dtype=torch.float64, device="meta"))


# --- norm_type=0 and messages as torch ----------------------------------------------------------

@pytest.mark.parametrize("grads", [
    [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 3.0]), torch.zeros(2)],
    [torch.tensor([math.nan, 0.0]), torch.zeros(2)],
    [torch.tensor([1.0, 2.0]), torch.tensor([math.inf, 0.0])],
])
def test_norm_type_zero_counts_tensors_as_torch(grads):
    torch.testing.assert_close(nanops.get_total_norm(grads, 0), torch.nn.utils.get_total_norm(grads, 0))


def test_norm_type_zero_clips_as_torch_on_finite_grads():
    grads = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 3.0]), torch.zeros(2)]
    ours, ref = params(*grads), params(*grads)
    torch.testing.assert_close(nanops.clip_grad_norm_(ours, 0.5, 0), torch.nn.utils.clip_grad_norm_(ref, 0.5, 0))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_nonfinite_error_message_names_the_order_as_torch_does():
    ps = params(torch.tensor([math.nan, 1.0]))
    with pytest.raises(RuntimeError, match=r"The total norm of order 2\.0 for gradients"):
        nanops.clip_grad_norm_(ps, 1.0, norm_type=2, error_if_nonfinite=True)


def test_norm_dtype_of_mixed_lists_does_not_depend_on_order():
    a, b = torch.ones(3, dtype=torch.float16), torch.ones(2, dtype=torch.float64)
    assert nanops.get_total_norm([a, b]).dtype == torch.float64
    assert nanops.get_total_norm([b, a]).dtype == torch.float64
    assert torch.nn.utils.get_total_norm([a, b]).dtype == torch.float64


# --- wrong types and values -------------------------------------------------------------------

@pytest.mark.parametrize("call, error, message", [
    (lambda: nanops.nonfinite_counts([1, 2]), TypeError, r"nonfinite_counts: tensors\[0\] must be a torch.Tensor"),
    (lambda: nanops.nonfinite_counts(np.ones(3)), TypeError, "numpy.ndarray"),
    (lambda: nanops.clip_grad_norm_(params(torch.ones(2)), 1.0, inv_scale=0.5), TypeError, "inv_scale must be"),
    (lambda: nanops.clip_grad_norm_(params(torch.ones(2)), math.nan), ValueError, "max_norm must be >= 0"),
    (lambda: nanops.clip_grad_norm_(params(torch.ones(2)), -1.0), ValueError, "max_norm must be >= 0"),
    (lambda: nanops.clip_grad_norm_(params(torch.ones(2)), "1"), TypeError, "max_norm must be a number"),
    (lambda: nanops.clip_grad_norm_(params(torch.ones(2)), 1.0, process_group=object()), TypeError,
     "process_group must be a torch.distributed ProcessGroup"),
    (lambda: nanops.get_total_norm([torch.ones(2, requires_grad=True)]), ValueError, "requires grad"),
    (lambda: nanops.clip_grads_with_norm_(params(torch.ones(2)), 1.0, 3.0), TypeError,
     "total_norm must be the one-element tensor"),
    (lambda: nanops.clip_grads_with_norm_(params(torch.ones(2)), 1.0, torch.ones(2)), TypeError,
     r"total_norm must be .* of shape \(2,\)"),
    (lambda: nanops.stable_softmax(torch.randn(2, 3), scale=torch.tensor(2.0, requires_grad=True)), ValueError,
     "scale is a tensor that requires grad"),
    (lambda: nanops.stable_softmax([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: nanops.guarded_step(None), TypeError, "optimizer must be a torch.optim.Optimizer"),
    (lambda: nanops.watch(None), TypeError, "model must be a torch.nn.Module"),
])
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_guarded_step_with_an_unused_scaler_raises_before_changing_anything():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()  # not through scaler.scale()
    scaler = torch.amp.GradScaler("cpu")
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="did not use scaler.scale"):
        nanops.guarded_step(optimizer, scaler)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(p.grad is not None for p in model.parameters())


def _torch_norms_sparse() -> bool:
    try:
        torch.linalg.vector_norm(torch.eye(2).to_sparse(), 2.0)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 0.0])
def test_sparse_grads_are_clipped_as_torch_does(norm_type):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    lin(emb(torch.tensor([1, 2, 1, 7]))).sum().backward()
    ours = list(emb.parameters()) + list(lin.parameters())
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for r, p in zip(ref, ours):
        # torch before 2.12 cannot norm a sparse tensor (linalg.vector_norm has no SparseCPU
        # kernel there): its answer for the same grads densified is the reference then.
        r.grad = p.grad.clone() if _torch_norms_sparse() else p.grad.clone().to_dense()
    torch.testing.assert_close(nanops.get_total_norm([p.grad for p in ours], norm_type),
                               torch.nn.utils.get_total_norm([p.grad for p in ref], norm_type))
    total = nanops.clip_grad_norm_(ours, 0.1, norm_type)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(ref, 0.1, norm_type))
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.grad.to_dense(), r.grad.to_dense())


def test_nonfinite_sparse_grad_is_left_untouched_and_flagged():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with torch.no_grad():
        emb.weight.grad._values().fill_(math.nan)  # in place, as a NaN backward leaves it
    found_inf = torch.zeros(1)
    before = emb.weight.grad.to_dense().clone()
    assert not torch.isfinite(nanops.clip_grad_norm_(emb.parameters(), 0.1, found_inf=found_inf))
    assert found_inf.item() == 1.0
    torch.testing.assert_close(emb.weight.grad.to_dense(), before, equal_nan=True)


# --- answers where nanops used to raise or give NaN ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("length", [3, 100])  # the scalar tail and the vector loop
@pytest.mark.parametrize("bad_logit", [math.inf, math.nan])
def test_minus_inf_additive_mask_masks_even_an_inf_or_nan_logit(dtype, length, bad_logit):
    x = torch.randn(2, length).to(dtype)
    x[:, 1] = bad_logit
    additive = torch.zeros(2, length, dtype=dtype)
    additive[:, 1] = -math.inf
    expected = nanops.stable_softmax(x, mask=additive != -math.inf)  # the bool mask's answer
    assert expected.isfinite().all()
    torch.testing.assert_close(nanops.stable_softmax(x, mask=additive), expected)
    torch.testing.assert_close(nanops.stable_softmax(x, mask=additive.float()), expected)  # float32 mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_beyond_float32_is_inf_with_found_inf_and_a_skipped_step(dtype):
    p = torch.nn.Parameter(torch.zeros(100, dtype=dtype))
    p.grad = torch.full((100,), 1e38, dtype=dtype)  # norm 1e39 > float32's 3.4e38
    found_inf = torch.zeros(1)
    assert torch.isinf(nanops.clip_grad_norm_([p], 1.0, found_inf=found_inf))
    assert found_inf.item() == 1.0 and (p.grad == torch.tensor(1e38, dtype=dtype)).all()  # untouched
    assert torch.isinf(nanops.get_total_norm([p.grad]))
    optimizer = torch.optim.SGD([p], lr=1.0)
    assert nanops.guarded_step(optimizer).skipped
    assert (p == 0).all()


class _FailingOp:
    """Stands in for a torch.ops.nanops overload whose kernel fails as a GPU can (out of memory)."""

    def __init__(self):
        self.calls = 0

    def default(self, *args):
        self.calls += 1
        raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test)")


@pytest.mark.parametrize("op,call", [
    ("all_finite", lambda: nanops.all_finite([torch.ones(3), torch.ones(2)])),
    ("nonfinite_counts", lambda: nanops.nonfinite_counts([torch.ones(3), None])),
    ("clip_grad_norm_", lambda: nanops.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0)),
])
def test_a_kernel_failure_reaches_the_caller_and_is_never_retried(op, call, monkeypatch):
    # Argument problems are ValueErrors raised before any kernel runs (another path may take the
    # list); a kernel's own failure (out of memory, a device fault) must surface at once.
    failing = _FailingOp()
    monkeypatch.setattr(torch.ops.nanops, op, failing)
    if op == "clip_grad_norm_":
        param = torch.nn.Parameter(torch.ones(3))
        param.grad = torch.ones(3)
        call = lambda: nanops.clip_grad_norm_([param], 1.0)  # noqa: E731
    with pytest.raises(torch.OutOfMemoryError):
        call()
    assert failing.calls == 1
