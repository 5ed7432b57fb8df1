"""yolov5 hyperparameters known to drive training into NaN, each with its reason and its fix.

`nanops doctor --hyp` prints them; `nanops train` runs them on its hyp at start, and its
divergence messages (nanops.training.divergence) quote them as the likely cause.
"""
from __future__ import annotations

import math


def run_hyp_warnings(hyp, optimizer: str = "SGD") -> list[str]:
    """hyp_warnings of a run's hyp (a dict, or the path of its YAML file); none where the file
    cannot be read (yolov5 then says so itself)."""
    import yaml
    from pathlib import Path

    try:
        values = hyp if isinstance(hyp, dict) else yaml.safe_load(Path(hyp).read_text())
        return hyp_warnings(values, optimizer) if isinstance(values, dict) else []
    except (OSError, UnicodeDecodeError, HypError, yaml.YAMLError):
        return []


class HypError(ValueError):
    """The hyp itself is unreadable (lr0 missing, a value that is not a number)."""


def hyp_warnings(hyp: dict, optimizer: str = "SGD") -> list[str]:
    """Warnings for yolov5 hyperparameters known to drive training into NaN, each with its reason."""
    if "lr0" not in hyp:
        raise HypError("the hyp file has no lr0")
    lr0 = _hyp_number(hyp, "lr0", None)
    momentum = _hyp_number(hyp, "momentum", 0.937)
    warmup_bias_lr = _hyp_number(hyp, "warmup_bias_lr", 0.1)
    weight_decay = _hyp_number(hyp, "weight_decay", 0.0)
    warnings: list[str] = [f"{name}={value:g}: not a finite number; training with it gives NaN at once"
                           for name, value in (("lr0", lr0), ("momentum", momentum),
                                               ("warmup_bias_lr", warmup_bias_lr), ("weight_decay", weight_decay))
                           if not math.isfinite(value)]
    adaptive = optimizer in ("Adam", "AdamW", "RMSProp")
    if adaptive and lr0 > 3e-3:
        warnings.append(
            f"lr0={lr0:g} with {optimizer}: adaptive optimizers move every weight by about lr0 per step whatever "
            f"the gradient's size, so SGD's lr0 (0.01 in yolov5's hyps) is ~10x what they tolerate and losses "
            f"blow up to NaN within the first epochs; use lr0=0.001 (yolov5's own choice for Adam)")
    if adaptive and warmup_bias_lr > 10 * lr0:
        warnings.append(
            f"warmup_bias_lr={warmup_bias_lr:g} with {optimizer} and lr0={lr0:g}: warm-up starts the biases at "
            f"{warmup_bias_lr / lr0:.0f}x lr0, a step size {optimizer} cannot absorb; set warmup_bias_lr close to lr0")
    if optimizer == "SGD" and lr0 > 0.1:
        warnings.append(f"lr0={lr0:g} with SGD: more than 10x yolov5's 0.01; expect the loss to diverge")
    if not 0 <= momentum < 1:
        warnings.append(f"momentum={momentum:g}: must lie in [0, 1) ({'beta1 of ' + optimizer if adaptive else 'SGD'}"
                        f" diverges otherwise)")
    if weight_decay > 0.01:
        warnings.append(f"weight_decay={weight_decay:g}: 20x yolov5's 0.0005 or more; weights collapse")
    return warnings


def _hyp_number(hyp: dict, name: str, default: float | None) -> float:
    value = hyp.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HypError(f"the hyp file's {name} must be a number, got {value!r}")
    return float(value)
