import pytest
import torch

import nanops
from conftest import DEVICES, FLOAT_DTYPES

NAN, INF = float("nan"), float("inf")


def reference_counts(tensors):
    rows = []
    for t in tensors:
        if t.dtype.is_floating_point:
            rows.append([t.isnan().sum().item(), t.isposinf().sum().item(), t.isneginf().sum().item()])
        else:
            rows.append([0, 0, 0])
    return torch.tensor(rows, dtype=torch.long).reshape(len(tensors), 3)


def planted(n, dtype, device, positions):
    """Random tensor with NaN, +Inf, -Inf cycled over `positions`."""
    t = torch.randn(n, device=device).to(dtype)
    for k, pos in enumerate(positions):
        t[pos] = (NAN, INF, -INF)[k % 3]
    return t


# CPU chunks hold 32768 elements, CUDA chunks 65536: plant on both sides of each boundary.
BOUNDARIES = [0, 1, 32767, 32768, 65535, 65536, 65537, 100_000, 200_000 - 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_planted_values_at_edges_and_chunk_boundaries(device, dtype):
    tensors = [
        planted(200_000, dtype, device, BOUNDARIES),
        planted(7, dtype, device, [3]),
        torch.randn(1000, device=device).to(dtype),
        planted(70_000, dtype, device, [35_000, 69_999]),
    ]
    out = nanops.nonfinite_counts(tensors)
    assert out.device.type == device and out.dtype == torch.long and out.shape == (4, 3)
    torch.testing.assert_close(out.cpu(), reference_counts([t.cpu() for t in tensors]), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_random_density_and_mixed_dtypes_in_one_list(device):
    tensors = []
    for i, dtype in enumerate(FLOAT_DTYPES * 5):
        t = torch.randn(1 + 997 * i, device=device).to(dtype)
        bad = torch.rand(t.shape, device=device) < 0.01
        t[bad] = torch.tensor([NAN, INF, -INF], device=device).to(dtype)[torch.randint(0, 3, (int(bad.sum()),), device=device)]
        tensors.append(t)
    torch.testing.assert_close(nanops.nonfinite_counts(tensors).cpu(), reference_counts([t.cpu() for t in tensors]))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_views(device):
    base = planted(300 * 400, torch.float32, device, [5, 1000, 50_000]).reshape(300, 400)
    views = [
        base.t(),                       # permuted but dense: read in place
        base[:, ::3],                   # strided: gaps between rows
        base[::2],                      # every other row
        base[0:1].expand(50, 400),      # stride 0
        base.to(torch.float16).t()[10:200, 5:300],
    ]
    torch.testing.assert_close(nanops.nonfinite_counts(views).cpu(), reference_counts([v.cpu() for v in views]))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_list_empty_tensors_none_and_generators(device):
    assert nanops.nonfinite_counts([]).shape == (0, 3)
    assert bool(nanops.all_finite([]))
    t = planted(10, torch.float32, device, [2])
    out = nanops.nonfinite_counts(x for x in [torch.empty(0, device=device), None, t, torch.empty(3, 0, device=device)])
    # one row per entry, None included (a parameter without a .grad), so rows line up with the list
    torch.testing.assert_close(out.cpu(), torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]]))
    grads = [None, t, None]
    torch.testing.assert_close(nanops.nonfinite_counts(grads).cpu(), torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 0]]))
    assert nanops.nonfinite_counts([None, None]).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert nanops.nonfinite_counts(t).shape == (1, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_a_thousand_tensors(device):
    tensors = [torch.randn(17 + i % 50, device=device) for i in range(1500)]
    for i in (0, 63, 64, 319, 320, 999, 1499):
        tensors[i][i % 17] = (NAN, INF, -INF)[i % 3]
    out = nanops.nonfinite_counts(tensors)
    torch.testing.assert_close(out.cpu(), reference_counts([t.cpu() for t in tensors]))
    assert not bool(nanops.all_finite(tensors))
    assert bool(nanops.all_finite(tensors[1:63]))


@pytest.mark.parametrize("device", DEVICES)
def test_integer_and_bool_tensors_count_as_finite(device):
    tensors = [torch.arange(10, device=device), torch.ones(3, dtype=torch.bool, device=device),
               torch.tensor([NAN], device=device)]
    torch.testing.assert_close(nanops.nonfinite_counts(tensors).cpu(), torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0]]))


def test_all_finite_stays_on_device_as_0_dim_bool():
    out = nanops.all_finite([torch.ones(3), torch.zeros(2)])
    assert out.dtype == torch.bool and out.dim() == 0 and bool(out)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="one device"):
        nanops.nonfinite_counts([torch.ones(2), torch.ones(2, device="meta")])
    with pytest.raises(ValueError, match="ComplexFloat"):
        nanops.nonfinite_counts([torch.ones(2, dtype=torch.complex64)])
    with pytest.raises(ValueError, match="dense"):
        nanops.nonfinite_counts([torch.ones(2), torch.eye(3).to_sparse()])
    with pytest.raises(ValueError, match="one device"):  # an argument problem, not a kernel's failure
        torch.ops.nanops.nonfinite_counts.default([torch.ones(2), torch.ones(2, device="meta")])


@pytest.mark.skipif(torch.cuda.is_available() or not nanops.cuda_built(), reason="checks the CPU-only-machine path")
def test_cuda_build_loaded_without_gpu_still_imports():
    assert nanops.cuda_built()  # CI compiles the CUDA kernels even without a GPU


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        [torch.randn(5, 7, device=device), torch.randn(3, device=device, dtype=torch.float16)],
        [planted(100, torch.float32, device, [0, 50, 99]), torch.randn(4, 4, device=device).t()],
    ]
    for tensors in samples:
        torch.library.opcheck(torch.ops.nanops.nonfinite_counts.default, (tensors,))


def test_traces_under_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def count(a, b):
        return nanops.nonfinite_counts([a * 2, b])

    a, b = torch.randn(10), planted(10, torch.float32, "cpu", [1, 2])
    torch.testing.assert_close(count(a, b), reference_counts([a, b]))


@pytest.mark.slow
def test_64bit_indexing_beyond_2_31_elements():
    n = 2**31 + 1000
    t = torch.zeros(n, dtype=torch.float16)
    t[2**31 + 7] = NAN
    t[-1] = -INF
    torch.testing.assert_close(nanops.nonfinite_counts(t), torch.tensor([[1, 0, 1]]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_all_finite_and_nonfinite_flag_are_one_op_each(device, dtype):
    for where, value in [(None, None), (0, NAN), (65536, INF), (199_999, -INF)]:
        t = torch.randn(200_000, device=device).to(dtype)
        if where is not None:
            t[where] = value
        tensors = [torch.arange(3, device=device), torch.empty(0, device=device, dtype=dtype), t]
        flag = nanops.ops.nonfinite_flag(tensors)
        assert flag.dtype == torch.float32 and flag.shape == (1,) and flag.device.type == device
        assert flag.item() == (0.0 if where is None else 1.0)
        assert bool(nanops.all_finite(tensors)) == (where is None)
    assert nanops.ops.nonfinite_flag([]).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_new_ops_opcheck_and_list_errors(device):
    tensors = [torch.randn(5, 7, device=device), planted(100, torch.float16, device, [3])]
    for op in (torch.ops.nanops.all_finite.default, torch.ops.nanops.nonfinite_flag.default):
        torch.library.opcheck(op, (tensors,))
        with pytest.raises(RuntimeError):  # no tensor, no device to dispatch on; the wrappers answer []
            op([])
    with pytest.raises(TypeError, match=r"all_finite: tensors\[1\] must be a torch.Tensor"):
        nanops.all_finite([torch.ones(2), 3])
    assert bool(nanops.all_finite([None, torch.ones(2, device=device)]))


@pytest.mark.parametrize("device", DEVICES)
def test_size_zero_tensors_between_and_lists_past_one_launch_table(device):
    tensors = [torch.empty(0, device=device) if i % 5 == 0 else torch.randn(i % 13 + 1, device=device)
               for i in range(1300)]
    tensors[1201][0] = NAN
    out = nanops.nonfinite_counts(tensors)
    torch.testing.assert_close(out.cpu(), reference_counts([t.cpu() for t in tensors]))
    assert not bool(nanops.all_finite(tensors)) and nanops.ops.nonfinite_flag(tensors).item() == 1.0
    assert bool(nanops.all_finite(tensors[:1200]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("count", [182, 1000])
def test_cuda_all_finite_is_one_kernel(count):
    tensors = [torch.randn(i % 300 + 1, device="cuda") for i in range(count)]
    nanops.all_finite(tensors)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        nanops.all_finite(tensors)
        nanops.ops.nonfinite_flag(tensors)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memset" not in e.name.lower()]
    assert len(kernels) == 2, [e.name for e in kernels]
