"""stable_softmax against what it stands in for, each row like for like.

Shapes are the attention logits of yolov5s-transformer's C3TR: (batch, 4 heads, L, L) with
L = 400 (640 px) and L = 1600 (1280 px), batch 16 (2 on the CPU for L = 1600).
  * fwd, no mask or scale: stable_softmax(x) vs torch.softmax(x). Target: >= 1.0x; >= 1.3x for
    16-bit at L = 1600 (CUDA).
  * fwd with scale and an additive (L, L) mask: vs torch.compile'd softmax(x * s + m), the fused
    kernel a user gets from the compiler. Target: >= 1.0x.
  * fwd+bwd, no mask or scale: vs torch.softmax's. Target: >= 1.0x.
GPU time (timing.compare: paired rounds; the forward rows replay CUDA graphs, so no host time
counts), and the host microseconds of one call apart (host_us columns, CUDA only).
"""
from __future__ import annotations

import sys

import torch

import nanops
from common import bench_device, report, row
from timing import compare, host_us, rotating, rotation_count


def fwd_bwd(fn):
    def run(x, grad):
        x.grad = None
        fn(x).backward(grad)

    return run


def compiled_masked_softmax():
    def softmax_scaled_masked(x, mask, scale: float):
        return torch.softmax(x * scale + mask, -1)

    return torch.compile(softmax_scaled_masked, dynamic=False)


def dtypes_for(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.float16, torch.bfloat16)


def _row(case, baseline, times, nbytes, device, host=None):
    extra = {}
    if host is not None:
        extra = {"baseline_host_us": host[0], "nanops_host_us": host[1]}
    return row(case, baseline, times["baseline"], times["nanops"], nbytes, **extra)


def main(argv=None) -> list[dict]:
    device = bench_device()
    cuda = device.type == "cuda"
    rows = []
    shapes = [(16, 4, 400, 400), (16 if cuda else 2, 4, 1600, 1600)]
    masked_baseline = compiled_masked_softmax()
    scale = 64 ** -0.5
    for shape in shapes:
        for dtype in dtypes_for(device):
            nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
            xs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(rotation_count(nbytes))]
            mask = torch.randn(shape[-2:], device=device, dtype=dtype)
            case = f"{tuple(shape)} {str(dtype).replace('torch.', '')}"
            plain = {"baseline": rotating(lambda x: torch.softmax(x, -1), [(x,) for x in xs]),
                     "nanops": rotating(lambda x: nanops.stable_softmax(x), [(x,) for x in xs])}
            host = (host_us(plain["baseline"], device), host_us(plain["nanops"], device)) if cuda else None
            rows.append(_row(f"fwd {case}", "torch.softmax(x)", compare(plain, device, graph=cuda), 2 * nbytes,
                             device, host))
            masked = {"baseline": rotating(lambda x: masked_baseline(x, mask, scale), [(x,) for x in xs]),
                      "nanops": rotating(lambda x: nanops.stable_softmax(x, scale=scale, mask=mask),
                                         [(x,) for x in xs])}
            rows.append(_row(f"fwd, scale + (L, L) mask, {case}", "torch.compile(softmax(x*s + m))",
                             compare(masked, device, graph=cuda), 2 * nbytes, device))
            grads = [(x.clone().requires_grad_(), torch.randn_like(x)) for x in xs[:2]]
            both = {"baseline": rotating(fwd_bwd(lambda x: torch.softmax(x, -1)), grads),
                    "nanops": rotating(fwd_bwd(nanops.stable_softmax), grads)}
            rows.append(_row(f"fwd+bwd {case}", "torch.softmax(x)", compare(both, device), None, device))
            del xs, grads
    return report("softmax", f"stable_softmax on {device}", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
