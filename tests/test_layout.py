"""The package's layers stay true: tools -> frameworks -> training -> ops, and every public name
is importable from the place the README documents."""
import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanops"

# Layer of each module (dotted name under nanops); a module may import only its own layer or lower.
OPS = 0
TRAINING = 1
FRAMEWORK = 2
TOOLS = 3
TOP = 4


OPS_MODULES = ("ops", "clip", "attention", "fused_attention", "transformer_layer", "nn", "patching", "_loader",
               "_fallback", "_distributed", "_torch_private", "_C")


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    head = parts[1]
    if head in OPS_MODULES:
        return OPS
    if head == "training":
        return TRAINING
    if head in ("yolov5", "ultralytics"):
        return FRAMEWORK
    if head == "tools":
        return TOOLS
    return TOP  # cli, __main__, the package itself


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every nanops import in the file, function-level ones included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "nanops"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nanops":
                continue
            if node.module is None or target == "nanops":  # `from . import x`: x may be a module
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert len(SOURCES) > 20
    heads = {_module_name(p).split(".")[1] for p in SOURCES if "." in _module_name(p)}
    assert heads <= {*OPS_MODULES, "training", "yolov5", "ultralytics", "tools", "cli", "__main__"}, heads


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    here = _module_name(path)
    wrong = []
    for line, target in _imports(path):
        if _layer(target) > _layer(here):
            wrong.append(f"{path.name}:{line} imports {target}")
        # The two framework wings stay independent of each other.
        if _layer(here) == FRAMEWORK and _layer(target) == FRAMEWORK and target.split(".")[1] != here.split(".")[1]:
            wrong.append(f"{path.name}:{line} imports the other wing {target}")
    assert not wrong, wrong


def test_the_import_walk_sees_relative_and_nested_imports():
    # The walk itself must be able to fail: guard.py imports the ops layer relatively.
    targets = {t for _, t in _imports(PACKAGE / "training" / "guard.py")}
    assert "nanops.clip" in targets
    cli = {t for _, t in _imports(PACKAGE / "cli.py")}
    assert "nanops.tools.demo" in cli and "nanops.yolov5.train" in cli  # imports inside functions


PUBLIC = {
    "nanops": ["Finding", "GradScaler", "Guard", "RngState", "StepResult", "Watch", "all_finite", "clip_grad_norm_",
               "clip_grads_with_norm_", "cuda_built", "get_total_norm", "guarded_step", "locate_forward",
               "locate_step", "nonfinite_counts", "patch", "stable_softmax", "unpatch", "watch", "nn", "yolov5"],
    "nanops.nn": ["MultiheadAttention", "TransformerLayer", "TransformerBlock", "C3TR", "Conv"],
    "nanops.training": ["Guard", "GradScaler", "guarded_step", "watch", "locate_step", "locate_forward",
                        "NormBufferSnapshot"],
    "nanops.yolov5": ["patch", "unpatch", "train", "build_transformer_model", "transformer_yaml"],
    "nanops.yolov5.train": ["run", "run_plain", "main", "inject_nonfinite_input", "SKIPPED_CSV", "SkippedStep"],
    "nanops.ultralytics": ["protect"],
    "nanops.tools.doctor": ["check_labels", "check_hyp", "find_label_files", "write_fixed_copies", "DoctorError"],
    "nanops.tools.demo": ["run_demo"],
    "nanops.tools.synthetic": ["write_yolo_dataset"],
    "nanops.training.inject": ["inject_nonfinite_input"],
    "nanops.cli": ["main"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import_from_their_documented_place(module):
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert not missing, missing


def test_yolov5_train_is_both_the_module_and_the_documented_function():
    import nanops
    import nanops.yolov5.train as as_module
    from nanops.yolov5.train import run

    assert as_module is nanops.yolov5.train and as_module.run is run and hasattr(as_module, "Protection")
    assert callable(nanops.yolov5.train)  # the documented nanops.yolov5.train(**kwargs)
    assert nanops.Guard is nanops.training.Guard and nanops.GradScaler is nanops.training.GradScaler
