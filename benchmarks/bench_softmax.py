"""stable_softmax vs torch.softmax and vs the unfused softmax(x * scale + mask) users write.

Shapes are the attention logits of yolov5s-transformer's C3TR: (batch, 4 heads, L, L) with
L = 400 (640 px) and L = 1600 (1280 px), batch 16 (smaller on CPU for L = 1600, printed).
Targets (issue 3): CUDA >= 1.0x torch.softmax and >= 1.5x the unfused version; CPU no slower
than torch.softmax.
"""
from __future__ import annotations

import sys

import torch

import nanops
from common import bench_device, report, row
from timing import measure, rotation_count


def torch_plain(x, mask, scale):
    return torch.softmax(x, -1)


def torch_unfused(x, mask, scale):
    return torch.softmax(x * scale + mask, -1)


def ours(x, mask, scale):
    return nanops.stable_softmax(x, scale=scale, mask=mask)


def fwd_bwd(fn):
    def run(x, mask, scale, grad):
        x.grad = None
        y = fn(x, mask, scale)
        y.backward(grad)

    return run


def main(argv=None) -> list[dict]:
    device = bench_device()
    rows = []
    shapes = [(16, 4, 400, 400), (16 if device.type == "cuda" else 2, 4, 1600, 1600)]
    for shape in shapes:
        for dtype in (torch.float32, torch.float16) + ((torch.bfloat16,) if device.type == "cuda" else ()):
            scale = 64 ** -0.5
            nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
            copies = rotation_count(nbytes)
            inputs = []
            for _ in range(copies):
                x = torch.randn(shape, device=device, dtype=dtype)
                mask = torch.zeros(shape[-2:], device=device, dtype=dtype)
                inputs.append((x, mask, scale))
            case = f"{tuple(shape)} {str(dtype).replace('torch.', '')}"
            t_ours = measure(ours, inputs, device)
            rows.append(row(f"fwd {case}", "torch.softmax(x)", measure(torch_plain, inputs, device), t_ours, 2 * nbytes))
            rows.append(row(f"fwd {case}", "torch.softmax(x*scale + mask)", measure(torch_unfused, inputs, device),
                            t_ours, 2 * nbytes))
            grad_inputs = [(x.clone().requires_grad_(), m, s, torch.randn_like(x)) for x, m, s in inputs[:2]]
            t_ours_b = measure(fwd_bwd(ours), grad_inputs, device)
            rows.append(row(f"fwd+bwd {case}", "torch.softmax(x)", measure(fwd_bwd(torch_plain), grad_inputs, device),
                            t_ours_b))
            rows.append(row(f"fwd+bwd {case}", "torch.softmax(x*scale + mask)",
                            measure(fwd_bwd(torch_unfused), grad_inputs, device), t_ours_b))
    return report("softmax", f"stable_softmax on {device}", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
