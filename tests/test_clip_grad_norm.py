import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nanops
from conftest import DEVICES, FLOAT_DTYPES, HAS_CUDA

NORM_TYPES = [0.5, 1.0, 1.5, 2.0, 4.0, math.inf]


def params_with_grads(shapes, device="cpu", dtype=torch.float32, scale=1.0):
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        p.grad = (torch.randn(shape, device=device, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


def reference_norm(grads, norm_type, inv_scale=1.0):
    flat = torch.cat([g.detach().double().flatten().cpu() for g in grads]) * inv_scale
    return torch.linalg.vector_norm(flat, norm_type)


# ---- adapted from the meaning of PyTorch's own clip_grad_norm_ tests ------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_returns_pre_clip_norm_and_clips_to_max_norm_uniformly(device, norm_type):
    params = params_with_grads([(10, 10), (5,), (3, 4, 2)], device, scale=10)
    before = [p.grad.clone() for p in params]
    max_norm = 2.0
    total = nanops.clip_grad_norm_(params, max_norm, norm_type)
    torch.testing.assert_close(total.double().cpu(), reference_norm(before, norm_type), rtol=1e-5, atol=0)
    torch.testing.assert_close(reference_norm([p.grad for p in params], norm_type),
                               torch.tensor(max_norm, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    ratios = torch.cat([(p.grad / b).flatten() for p, b in zip(params, before)])
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()), rtol=1e-5, atol=0)
    # Same numbers as torch itself.
    torch_params = [torch.nn.Parameter(b.clone()) for b in before]
    for tp, b in zip(torch_params, before):
        tp.grad = b.clone()
    torch_total = torch.nn.utils.clip_grad_norm_(torch_params, max_norm, norm_type)
    torch.testing.assert_close(total, torch_total, rtol=1e-5, atol=0)
    for p, tp in zip(params, torch_params):
        torch.testing.assert_close(p.grad, tp.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_small_grads_untouched(device, norm_type):
    params = params_with_grads([(10, 10), (5,)], device, scale=1e-3)
    before = [p.grad.clone() for p in params]
    nanops.clip_grad_norm_(params, 100.0, norm_type)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


@pytest.mark.parametrize("device", DEVICES)
def test_single_tensor_same_as_list(device):
    (a,) = params_with_grads([(20, 20)], device, scale=5)
    b = torch.nn.Parameter(a.detach().clone())
    b.grad = a.grad.clone()
    torch.testing.assert_close(nanops.clip_grad_norm_(a, 1.0), nanops.clip_grad_norm_([b], 1.0))
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_error_if_nonfinite_raises_and_leaves_grads_unchanged(device, bad, norm_type):
    params = params_with_grads([(10,), (4, 4)], device)
    params[1].grad[2, 3] = bad
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        nanops.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_large_finite_norm_does_not_error(device):
    # 2e22 squared overflows float32 in torch's per-tensor norms; ours accumulates in float64.
    params = params_with_grads([(3,)], device)
    params[0].grad.fill_(2e22)
    total = nanops.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    torch.testing.assert_close(total.double().cpu(), torch.tensor(2e22 * math.sqrt(3), dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(params[0].grad.norm().double().cpu(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_values_near_1e20_and_float64_near_1e200_give_finite_norms(device):
    f32 = params_with_grads([(1000,)], device, scale=1e20)
    f64 = params_with_grads([(1000,)], device, dtype=torch.float64, scale=1e200)
    for params in (f32, f64):
        for norm_type in NORM_TYPES:
            total = nanops.get_total_norm([p.grad for p in params], norm_type)
            expected = reference_norm([p.grad for p in params], norm_type) if params is f32 else None
            assert torch.isfinite(total)
            if expected is not None:
                torch.testing.assert_close(total.double().cpu(), expected, rtol=1e-5, atol=0)
    # float64 1e200 values: compare in log space (the float64 reference itself overflows).
    g = f64[0].grad
    expected_log = math.log(g.abs().max().item()) + 0.5 * math.log(((g / g.abs().max()) ** 2).sum().item())
    assert math.isclose(math.log(nanops.get_total_norm(g).item()), expected_log, rel_tol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_values_do_not_underflow_to_zero(device):
    g = torch.full((100,), 1e-30, device=device)
    for norm_type in (2.0, 4.0, 8.0):
        torch.testing.assert_close(nanops.get_total_norm(g, norm_type).double().cpu(),
                                   torch.tensor(1e-30 * 100 ** (1 / norm_type), dtype=torch.float64), rtol=1e-5, atol=0)


# ---- what torch gets wrong ------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_fp16_norm_above_65504_clips_correctly(device):
    params = params_with_grads([(1000,)], device, dtype=torch.float16)
    params[0].grad.fill_(30000.0)
    before = params[0].grad.clone()
    total = nanops.clip_grad_norm_(params, 1.0)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.double().cpu(), torch.tensor(30000.0 * math.sqrt(1000), dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(params[0].grad.float().norm().cpu(), torch.tensor(1.0), rtol=2e-3, atol=0)
    # torch: the float16 norm overflows to inf and every grad becomes 0.
    tp = torch.nn.Parameter(before.clone())
    tp.grad = before.clone()
    assert torch.isinf(torch.nn.utils.clip_grad_norm_([tp], 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_grads_are_left_unchanged_and_flag_found_inf(device, bad):
    params = params_with_grads([(10,), (4, 4)], device)
    params[0].grad[3] = bad
    before = [p.grad.clone() for p in params]
    found_inf = torch.zeros(1, device=device)
    total = nanops.clip_grad_norm_(params, 1.0, found_inf=found_inf)
    assert not torch.isfinite(total)
    assert found_inf.item() == 1.0
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b, equal_nan=True, rtol=0, atol=0)
    # Without found_inf the grads stay as they are too (torch would make them all NaN).
    nanops.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(params[1].grad, before[1], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_is_never_reset(device):
    params = params_with_grads([(10,)], device)
    found_inf = torch.ones(1, device=device)
    nanops.clip_grad_norm_(params, 1.0, found_inf=found_inf)
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inv_scale_fuses_amp_unscale(device, dtype):
    scale = 1024.0
    params = params_with_grads([(50, 50), (7,)], device, dtype=dtype, scale=scale)
    before = [p.grad.clone() for p in params]
    inv_scale = torch.full((1,), 1 / scale, device=device)
    total = nanops.clip_grad_norm_(params, 1.0, inv_scale=inv_scale)
    expected_norm = reference_norm(before, 2.0, 1 / scale)
    torch.testing.assert_close(total.double().cpu(), expected_norm, rtol=1e-5, atol=0)
    coef = min(1.0, 1.0 / (expected_norm.item() + 1e-6))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad.double(), b.double() / scale * coef, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_inv_scale_unscales_even_when_no_clipping_needed(device):
    params = params_with_grads([(10,)], device, scale=1e-3)
    before = params[0].grad.clone()
    nanops.clip_grad_norm_(params, 1e6, inv_scale=torch.tensor([0.5], device=device))
    torch.testing.assert_close(params[0].grad, before * 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_list(device):
    params = []
    for dtype in FLOAT_DTYPES:
        params += params_with_grads([(33, 7)], device, dtype=dtype, scale=3)
    before = [p.grad.clone() for p in params]
    total = nanops.clip_grad_norm_(params, 1.0)
    assert total.dtype == torch.float64  # the promotion of every grad dtype, whatever the order (as torch)
    torch.testing.assert_close(total.double().cpu(), reference_norm(before, 2.0), rtol=1e-5, atol=0)
    coef = 1.0 / (reference_norm(before, 2.0).item() + 1e-6)
    for p, b in zip(params, before):
        tol = {torch.float32: 1e-5, torch.float64: 1e-7, torch.float16: 2e-3, torch.bfloat16: 1e-2}[p.dtype]
        torch.testing.assert_close(p.grad.double(), b.double() * coef, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors_and_none_grads(device):
    params = params_with_grads([(0,), (10,), (3, 0)], device, scale=10)
    params.append(torch.nn.Parameter(torch.ones(3, device=device)))  # grad None: skipped
    before = params[1].grad.clone()
    total = nanops.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(total.cpu(), before.norm().cpu())
    torch.testing.assert_close(params[1].grad.norm().cpu(), torch.tensor(1.0), rtol=1e-5, atol=0)
    assert params[3].grad is None
    only_empty = params_with_grads([(0,)], device)
    assert nanops.clip_grad_norm_(only_empty, 1.0).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_a_thousand_params(device):
    params = params_with_grads([(i % 37 + 1,) for i in range(1200)], device, scale=2)
    before = [p.grad.clone() for p in params]
    total = nanops.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(total.double().cpu(), reference_norm(before, 2.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(reference_norm([p.grad for p in params], 2.0), torch.tensor(1.0, dtype=torch.float64),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_grads(device):
    p = torch.nn.Parameter(torch.empty(20, 30, device=device))
    p.grad = torch.randn(30, 20, device=device).t() * 10   # dense, permuted
    q = torch.nn.Parameter(torch.empty(10, device=device))
    q.grad = (torch.randn(10, 3, device=device) * 10)[:, 1]  # strided
    before = [p.grad.clone(), q.grad.clone()]
    total = nanops.clip_grad_norm_([p, q], 1.0)
    torch.testing.assert_close(total.double().cpu(), reference_norm(before, 2.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(reference_norm([p.grad, q.grad], 2.0), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)


def test_exhausted_generator_warns_and_returns_zero():
    params = params_with_grads([(3,)])
    gen = (p for p in params)
    list(gen)
    with pytest.warns(UserWarning, match="empty generator"):
        total = nanops.clip_grad_norm_(gen, 1.0)
    assert total.item() == 0.0


def test_bad_arguments_get_clear_errors():
    params = params_with_grads([(3,)])
    with pytest.raises(ValueError, match="norm_type"):
        nanops.clip_grad_norm_(params, 1.0, norm_type=-1)
    with pytest.raises(ValueError, match="norm_type"):
        nanops.clip_grad_norm_(params, 1.0, norm_type=float("nan"))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        nanops.get_total_norm([torch.ones(3, dtype=torch.long)])
    mixed = [torch.ones(3), torch.ones(2, dtype=torch.half), torch.ones(3, dtype=torch.int32), torch.ones(1, dtype=torch.long)]
    with pytest.raises(ValueError, match="gradient 2 has dtype torch.int32"):
        nanops.get_total_norm(mixed)
    with pytest.raises(ValueError, match="one element"):
        nanops.clip_grad_norm_(params, 1.0, inv_scale=torch.ones(2))


def test_split_api_matches_torch():
    grads = [torch.randn(10, 10) * 5, torch.randn(7) * 5]
    for norm_type in NORM_TYPES:
        torch.testing.assert_close(nanops.get_total_norm(grads, norm_type),
                                   torch.nn.utils.get_total_norm(grads, norm_type), rtol=1e-5, atol=0)
    params = params_with_grads([(10, 10), (7,)], scale=5)
    twins = params_with_grads([(10, 10), (7,)])
    for p, t in zip(params, twins):
        t.grad = p.grad.clone()
    total = nanops.get_total_norm([p.grad for p in params])
    nanops.clip_grads_with_norm_(params, 1.0, total)
    torch.nn.utils.clip_grads_with_norm_(twins, 1.0, torch.nn.utils.get_total_norm([t.grad for t in twins]))
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.grad, t.grad)
    before = params[0].grad.clone()
    nanops.clip_grads_with_norm_(params, 1.0, torch.tensor(float("inf")))
    assert torch.equal(params[0].grad, before)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    grads = [torch.randn(10, 10, device=device), torch.randn(5, device=device, dtype=torch.float16)]
    inv_scale = torch.tensor([0.5], device=device)
    for args in [(grads, 2.0, None), (grads, 1.0, inv_scale), (grads, math.inf, None), (grads, 0.0, None)]:
        torch.library.opcheck(torch.ops.nanops.grad_norm_summary.default, args)
    summaries = torch.stack([torch.ops.nanops.grad_norm_summary.default(grads, 2.0, None)] * 2)
    found_inf = torch.zeros(1, device=device)
    torch.library.opcheck(torch.ops.nanops.clip_coef_from_summaries.default,
                          (summaries, 2.0, 1.0, inv_scale, found_inf, torch.float32))
    coef = torch.tensor(0.5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.nanops.scale_tensors_.default, ([g.clone() for g in grads], coef))


# ---- sharded grads over torch.distributed (gloo, 2 processes) ---------------------------------

def _distributed_worker(rank, world, init_file, shards, max_norm, norm_type, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = []
        for g in shards[rank]:
            p = torch.nn.Parameter(torch.empty_like(g))
            p.grad = g.clone()
            params.append(p)
        found_inf = torch.zeros(1)
        total = nanops.clip_grad_norm_(params, max_norm, norm_type, found_inf=found_inf, process_group=dist.group.WORLD)
        results[rank] = (total, [p.grad for p in params], found_inf)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
def test_distributed_matches_unsharded(norm_type):
    torch.manual_seed(1)
    # Rank 1 holds magnitudes 1e30 times rank 0's: summaries combine without overflow.
    shards = [[torch.randn(100, 3), torch.randn(17)], [torch.randn(50) * 1e30]]
    unsharded = params_with_grads([(100, 3), (17,), (50,)])
    for p, g in zip(unsharded, shards[0] + shards[1]):
        p.grad = g.clone()
    expected_total = nanops.clip_grad_norm_(unsharded, 1.0, norm_type)
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, "store"), shards, 1.0, norm_type, results), nprocs=2)
        for rank, own in ((0, unsharded[:2]), (1, unsharded[2:])):
            total, grads, found_inf = results[rank]
            torch.testing.assert_close(total, expected_total, rtol=1e-6, atol=0)
            assert found_inf.item() == 0.0
            for g, p in zip(grads, own):
                torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [1.0, 2.0])
def test_large_float32_list_norm_is_float64_accurate(device, norm_type):
    # Millions of float32 values: the float32 vector path flushes into float64 often enough that
    # the norm stays within 1e-6 of the float64 reference (torch's float32 norms drift more).
    grads = [torch.randn(2_000_003, device=device) * 3, torch.rand(777_777, device=device)]
    total = nanops.get_total_norm(grads, norm_type)
    torch.testing.assert_close(total.double().cpu(), reference_norm(grads, norm_type), rtol=1e-6, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none on this machine)")
def test_cuda_graph_capture_of_fused_unscale_and_clip():
    # No host sync anywhere in clip_grad_norm_ (without error_if_nonfinite): the whole fused
    # unscale + norm + clip must capture into a CUDA graph, and each replay must act on the
    # grads' current values, including the non-finite case (found_inf set, grads untouched).
    params = params_with_grads([(1000,), (33, 7), (0,), (70_000,)], "cuda", scale=10)
    inv_scale = torch.full((1,), 0.5, device="cuda")
    found_inf = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs require
        nanops.clip_grad_norm_(params, 1.0, inv_scale=inv_scale, found_inf=found_inf)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = nanops.clip_grad_norm_(params, 1.0, inv_scale=inv_scale, found_inf=found_inf)

    for trial in range(3):
        fresh = [torch.randn_like(p.grad) * (trial + 1) * 10 for p in params]
        for p, g in zip(params, fresh):
            p.grad.copy_(g)
        found_inf.zero_()
        graph.replay()
        expected_norm = reference_norm(fresh, 2.0, 0.5)
        torch.testing.assert_close(total.double().cpu(), expected_norm, rtol=1e-5, atol=0)
        coef = min(1.0, 1.0 / (expected_norm.item() + 1e-6))
        for p, g in zip(params, fresh):
            torch.testing.assert_close(p.grad, g * 0.5 * coef, rtol=1e-5, atol=1e-7)
        assert found_inf.item() == 0.0

    params[3].grad[123] = float("inf")
    before = [p.grad.clone() for p in params]
    graph.replay()
    assert found_inf.item() == 1.0
    assert not torch.isfinite(total).item()
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


# ---- the fused one-call path, non-dense 16-bit grads, norm_type=0 over a group -----------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value, inv_scale, max_norm", [(8.0, 2.0**-16, 1e-3), (60000.0, 2.0**-24, 10.0),
                                                        (3.0, 1.0, 0.7)])
def test_non_dense_grads_get_exactly_the_dense_result(device, dtype, value, inv_scale, max_norm):
    # The coefficient is applied in float32 to every grad, dense or not: a non-dense fp16 grad
    # multiplied by a coefficient rounded to fp16 used to be 1.5% off, or 0.
    dense = torch.nn.Parameter(torch.empty(64, 32, device=device, dtype=dtype))
    dense.grad = torch.full((64, 32), value, device=device, dtype=dtype)
    strided = torch.nn.Parameter(torch.empty(64, 32, device=device, dtype=dtype))
    strided.grad = torch.full((64, 64), value, device=device, dtype=dtype)[:, ::2]
    assert not strided.grad.is_contiguous() and strided.grad.stride() == (64, 2)
    scale = torch.tensor([inv_scale], device=device)
    nanops.clip_grad_norm_([dense, strided], max_norm, inv_scale=scale)
    assert torch.equal(strided.grad, dense.grad)
    assert dense.grad.float().abs().min() > 0
    # And that result is the float32 product, rounded once.
    norm = math.sqrt(2 * 64 * 32) * value * inv_scale
    coef = torch.tensor(inv_scale * min(1.0, max_norm / (norm + 1e-6)), dtype=torch.float64)
    expected = (torch.tensor(value, dtype=dtype).float() * coef.float()).to(dtype)
    assert torch.equal(dense.grad.cpu(), torch.full((64, 32), expected.item(), dtype=dtype))


def _grads_for_count(device):
    return params_with_grads([(3,), (2,), (4,)], device), [torch.ones(3), torch.zeros(2), torch.tensor([0, 5.0, 0, 0])]


@pytest.mark.parametrize("device", DEVICES)
def test_norm_type_zero_counts_tensors_with_and_without_a_process_group(device, tmp_path):
    # torch's meaning: the number of tensors holding a non-zero (2 here), not of non-zero
    # elements (4); over a world of one, the same number; with NaN, counted as non-zero, the
    # grads untouched and found_inf set, on both paths.
    def run(process_group, values):
        params, _ = _grads_for_count(device)
        for p, v in zip(params, values):
            p.grad = v.to(device).clone()
        found_inf = torch.zeros(1, device=device)
        total = nanops.clip_grad_norm_(params, 1.0, 0, found_inf=found_inf, process_group=process_group)
        return total, [p.grad for p in params], found_inf

    _, values = _grads_for_count(device)
    torch_params = [torch.nn.Parameter(v.clone()) for v in values]
    for p, v in zip(torch_params, values):
        p.grad = v.clone()
    expected = torch.nn.utils.clip_grad_norm_(torch_params, 1.0, 0)
    assert expected.item() == 2.0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for group in (None, dist.group.WORLD):
            total, grads, found_inf = run(group, values)
            assert total.item() == 2.0 and found_inf.item() == 0.0
            for g, tp in zip(grads, torch_params):
                torch.testing.assert_close(g.cpu(), tp.grad)
            with_nan = [values[0], torch.tensor([float("nan"), 0.0]), values[2]]
            total, grads, found_inf = run(group, with_nan)
            assert total.item() == 3.0 and found_inf.item() == 1.0
            assert torch.equal(grads[0].cpu(), values[0]) and grads[1].isnan().any()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_op_matches_the_general_path_and_opcheck(device):
    grads = [torch.randn(10, 10, device=device) * 5, torch.randn(5, device=device, dtype=torch.float16),
             torch.randn(0, device=device), torch.randn(3, 4, device=device).t()]
    inv_scale = torch.tensor([0.5], device=device)
    for scale_grads in (False, True):
        found_inf = torch.zeros(1, device=device)
        copies = [g.clone() for g in grads]
        total, coef, divisor = torch.ops.nanops.clip_grad_norm_.default(copies, 1.0, 2.0, inv_scale, found_inf,
                                                                       scale_grads)
        expected = reference_norm(grads, 2.0, 0.5)
        torch.testing.assert_close(total.double().cpu(), expected, rtol=1e-6, atol=0)
        assert total.dtype == torch.float32 and coef.dtype == torch.float64 and divisor.dtype == torch.float32
        expected_coef = 0.5 * min(1.0, 1.0 / (expected.item() + 1e-6))
        assert coef.item() == pytest.approx(expected_coef, rel=1e-6)
        assert divisor.item() == pytest.approx(1.0 / expected_coef, rel=1e-6)
        changed = not all(torch.equal(c, g) for c, g in zip(copies, grads))
        assert changed == scale_grads
        torch.library.opcheck(torch.ops.nanops.clip_grad_norm_.default,
                              ([g.clone() for g in grads], 1.0, 2.0, inv_scale, torch.zeros(1, device=device),
                               scale_grads))


def test_fused_op_names_bad_arguments():
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        torch.ops.nanops.clip_grad_norm_.default([torch.ones(2)], -1.0, 2.0, None, None, True)
    with pytest.raises(ValueError, match="norm_type must be >= 0"):
        torch.ops.nanops.clip_grad_norm_.default([torch.ones(2)], 1.0, -2.0, None, None, True)
    with pytest.raises(ValueError, match=r"tensors\[1\] has dtype Long"):
        torch.ops.nanops.clip_grad_norm_.default([torch.ones(2), torch.ones(2, dtype=torch.long)], 1.0, 2.0, None,
                                                 None, True)


@pytest.mark.parametrize("device", DEVICES)
def test_size_zero_tensors_and_lists_longer_than_one_launch_table(device):
    # 1152 tensors fit one CUDA launch table: 1400 take two; size-0 tensors take no chunk.
    shapes = [(0,) if i % 97 == 0 else (i % 41 + 1,) for i in range(1400)]
    params = params_with_grads(shapes, device, scale=3)
    before = [p.grad.clone() for p in params]
    total = nanops.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(total.double().cpu(), reference_norm(before, 2.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(reference_norm([p.grad for p in params], 2.0), torch.tensor(1.0, dtype=torch.float64),
                               rtol=1e-5, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("count", [182, 1000])
def test_cuda_clip_is_two_kernels_and_norm_is_one(count):
    # The norm and its coefficient are one kernel (the last block combines), the scale another;
    # a 1000-tensor list still fits one launch table.
    params = params_with_grads([(i % 300 + 1,) for i in range(count)], "cuda", scale=5)
    nanops.clip_grad_norm_(params, 1.0)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        nanops.clip_grad_norm_(params, 1.0)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()]
    assert len(kernels) == 2, [e.name for e in kernels]
