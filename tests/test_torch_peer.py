"""torch's own test material run against nanops, so any drift from torch shows up in CI.

Where nanops differs from torch on purpose, the difference is an explicit, named exception
below (and in the README's "Documented differences"), checked for what nanops does instead.
"""
import math

import pytest
import torch

import nanops

common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations", reason="torch's test internals need `expecttest`")

SOFTMAX_OPS = [op for op in common_methods_invocations.op_db if op.name == "softmax"]
FOREACH_NORM = next(op for op in common_methods_invocations.foreach_reduce_op_db if op.name == "_foreach_norm")

# nanops supports p-norms with p >= 0 and inf (clip_grad_norm_'s domain); negative orders and
# -inf are not norms of a gradient list.
SUPPORTED_ORDS = {0, 1, 2, math.inf}


def _softmax_samples():
    for op in SOFTMAX_OPS:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for i, sample in enumerate(op.sample_inputs("cpu", dtype)):
                yield pytest.param(sample, dtype, id=f"{op.variant_test_name or 'plain'}-{dtype}-{i}")


@pytest.mark.parametrize("sample, dtype", list(_softmax_samples()))
def test_softmax_opinfo_samples(sample, dtype):
    x, (dim,), kwargs = sample.input, sample.args, sample.kwargs
    expected = torch.softmax(x, dim, **kwargs)
    if x.dim() == 0:
        # DIFFERENCE zero-dim input: nanops' softmax needs a dimension to normalise over.
        with pytest.raises((RuntimeError, IndexError)):
            nanops.stable_softmax(x, dim)
        return
    ours = nanops.stable_softmax(x.to(kwargs.get("dtype", x.dtype)), dim)
    tol = dict(rtol=1.6e-2, atol=1e-3) if dtype == torch.bfloat16 and "dtype" not in kwargs else {}
    torch.testing.assert_close(ours, expected, **tol)


def test_softmax_difference_fully_masked_and_inf_rows():
    x = torch.tensor([[-math.inf, -math.inf], [math.inf, 1.0], [1.0, 2.0]])
    expected = torch.softmax(x, -1)
    assert expected[:2].isnan().all()  # torch
    ours = nanops.stable_softmax(x, -1)
    # DIFFERENCE fully masked row: zeros; +inf logits: the mass shared among them.
    torch.testing.assert_close(ours[0], torch.zeros(2))
    torch.testing.assert_close(ours[1], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(ours[2], expected[2])


def _foreach_norm_samples():
    for dtype in (torch.float32, torch.float64):
        for i, sample in enumerate(FOREACH_NORM.sample_inputs("cpu", dtype)):
            ord_ = sample.kwargs.get("ord", 2)
            if ord_ in SUPPORTED_ORDS:
                yield pytest.param(sample, id=f"{dtype}-ord{ord_}-{i}")


@pytest.mark.parametrize("sample", list(_foreach_norm_samples()))
def test_foreach_norm_samples_total_norm(sample):
    tensors, ord_ = list(sample.input), sample.kwargs.get("ord", 2)
    norms = torch._foreach_norm(tensors, ord_)
    expected = torch.linalg.vector_norm(torch.stack([n.double() for n in norms]), ord_)
    ours = nanops.get_total_norm(tensors, ord_)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, torch.nn.utils.get_total_norm(tensors, ord_), rtol=1e-5, atol=1e-6)


def test_unsupported_orders_are_refused_clearly():
    with pytest.raises(ValueError, match="norm_type must be >= 0 or inf"):
        nanops.get_total_norm([torch.ones(3)], -1)
    with pytest.raises(ValueError, match="norm_type must be >= 0 or inf"):
        nanops.get_total_norm([torch.ones(3)], -math.inf)


# --- torch's test_clip_grad_norm (test/nn/test_nn.py), ported -------------------------------

def _linear_with_grads(scale):
    layer = torch.nn.Linear(10, 10)
    grads = torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)
    for p, g in zip(layer.parameters(), grads):
        p._grad = g.clone().view_as(p.data) * scale
    return layer


@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
def test_clip_grad_norm_port(norm_type):
    max_norm = 2
    norm_type = float(norm_type)
    layer = _linear_with_grads(1.0)

    def compute_norm(norm_type):
        if math.isinf(norm_type):
            return max(p.grad.abs().max() for p in layer.parameters())
        return sum(p.grad.abs().pow(norm_type).sum() for p in layer.parameters()) ** (1 / norm_type)

    norm_before = compute_norm(norm_type)
    norm = nanops.clip_grad_norm_(layer.parameters(), max_norm, norm_type=norm_type)
    norm_after = compute_norm(norm_type)
    torch.testing.assert_close(norm, norm_before)
    torch.testing.assert_close(norm_after, torch.tensor(float(max_norm)))
    assert norm_after <= max_norm
    scaled = [p.grad / g for p, g in zip(layer.parameters(), (torch.arange(1.0, 101).view(10, 10),
                                                                torch.ones(10).div(1000)))]
    torch.testing.assert_close(scaled[0].flatten()[0].expand(10, 10), scaled[0])
    # Small gradients (torch's second case): the same result as torch's own clip.
    torch.manual_seed(0)
    small = [torch.rand(10, 10).div(10000), torch.ones(10).div(500)]
    ours, ref = _linear_with_grads(1.0), _linear_with_grads(1.0)
    for layer_, grads_ in ((ours, small), (ref, small)):
        for p, g in zip(layer_.parameters(), grads_):
            p.grad = g.clone()
    torch.testing.assert_close(nanops.clip_grad_norm_(ours.parameters(), max_norm, norm_type=norm_type),
                               torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type=norm_type))
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # A single tensor works as a list of one.
    p = torch.randn(10, 10, requires_grad=True)
    p.grad = torch.randn(10, 10)
    q = p.detach().clone().requires_grad_(True)
    q.grad = p.grad.clone()
    torch.testing.assert_close(nanops.clip_grad_norm_(p, max_norm, norm_type),
                               torch.nn.utils.clip_grad_norm_([q], max_norm, norm_type))
    torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("norm_type", [0.5, 1, 2, 4, math.inf])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clip_grad_norm_error_if_nonfinite_port(norm_type, bad):
    layer = torch.nn.Linear(10, 10)
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    layer.weight.grad[0, 0] = bad
    before = [p.grad.clone() for p in layer.parameters()]
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        nanops.clip_grad_norm_(layer.parameters(), 1.0, norm_type, error_if_nonfinite=True)
    for p, b in zip(layer.parameters(), before):
        torch.testing.assert_close(p.grad, b, equal_nan=True)  # torch: grads unchanged too
    total = nanops.clip_grad_norm_(layer.parameters(), 1.0, norm_type, error_if_nonfinite=False)
    assert not torch.isfinite(total)
    # DIFFERENCE error_if_nonfinite=False: torch multiplies the grads by NaN or 0; nanops leaves them.
    for p, b in zip(layer.parameters(), before):
        torch.testing.assert_close(p.grad, b, equal_nan=True)


# --- GradScaler.unscale_ (torch's test_grad_scaling_unscale, the meaning of it) ------------

@pytest.mark.parametrize("poison", [None, math.inf, math.nan])
def test_grad_scaler_unscale_matches_torch(poison):
    torch.manual_seed(0)
    grads = [torch.randn(4, 4) * 4.0, torch.randn(7) * 4.0]
    if poison is not None:
        grads[1][3] = poison
    results = []
    for cls in (torch.amp.GradScaler, nanops.GradScaler):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = torch.optim.SGD(params, lr=1.0)
        scaler = cls("cpu", init_scale=4.0)
        scaler.scale(torch.zeros(()))  # initialises the scale, as scale(loss) does
        scaler.unscale_(opt)
        found = sum(v.item() for v in scaler._found_inf_per_device(opt).values())
        results.append(([p.grad.clone() for p in params], found))
    (ref_grads, ref_found), (our_grads, our_found) = results
    assert our_found == ref_found == (0.0 if poison is None else 1.0)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, equal_nan=True)


# Importing torch's test utilities (and drawing their samples, above) freezes the global cudnn
# flags for torch's own suite; yolov5's training in other test files sets them, as any user
# program may. Unfrozen once every sample of this module has been drawn.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
