"""The package's layers stay true: tools -> frameworks -> training -> ops, and every public name
is importable from the place the README documents."""
import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanops"

# Layer of each module (dotted name under nanops); a module may import only its own layer or lower.
OPS = 0
TRAINING = 1
FRAMEWORK = 2
TOOLS = 3
TOP = 4


WINGS = ("yolov5", "ultralytics", "lightning", "timm", "huggingface")  # one per framework
OPS_MODULES = ("ops", "clip", "grad_norms", "attention", "fused_attention", "transformer_layer", "nn", "patching", "_loader",
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
    if head in WINGS:
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


def _from_target(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module a `from ... import` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every nanops import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "nanops"]
        elif isinstance(node, ast.ImportFrom):
            target = _from_target(node, path)
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
    assert heads <= {*OPS_MODULES, "training", *WINGS, "tools", "cli", "__main__"}, heads


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    here = _module_name(path)
    wrong = []
    for line, target in _imports(path):
        if _layer(target) > _layer(here):
            wrong.append(f"{path.name}:{line} imports {target}")
        # The framework wings stay independent of each other.
        if _layer(here) == FRAMEWORK and _layer(target) == FRAMEWORK and target.split(".")[1] != here.split(".")[1]:
            wrong.append(f"{path.name}:{line} imports the other wing {target}")
    assert not wrong, wrong


def test_the_import_walk_sees_relative_and_nested_imports():
    # The walk itself must be able to fail: guard.py imports the ops layer relatively.
    targets = {t for _, t in _imports(PACKAGE / "training" / "guard.py")}
    assert "nanops.clip" in targets
    cli = {t for _, t in _imports(PACKAGE / "cli.py")}
    assert "nanops.tools.demo" in cli and "nanops.yolov5.cli" in cli  # imports inside functions


PUBLIC = {
    "nanops": ["Finding", "GradScaler", "Guard", "RngState", "StepResult", "Watch", "all_finite", "clip_grad_norm_",
               "clip_grads_with_norm_", "cuda_built", "get_total_norm", "guarded_step", "locate_forward",
               "locate_step", "nonfinite_counts", "patch", "stable_softmax", "unpatch", "watch", "nn", "yolov5"],
    "nanops.nn": ["MultiheadAttention", "TransformerLayer", "TransformerBlock", "C3TR", "Conv"],
    "nanops.training": ["Guard", "GradScaler", "guarded_step", "watch", "locate_step", "locate_forward",
                        "NormBufferSnapshot", "Session", "SkippedStep", "SkipReport", "checkpoint_loading"],
    "nanops.yolov5": ["patch", "unpatch", "train", "run", "run_plain", "build_transformer_model", "transformer_yaml",
                      "SKIPPED_CSV", "SkippedStep"],
    "nanops.yolov5.cli": ["main"],
    "nanops.ultralytics": ["protect"],
    "nanops.lightning": ["Protect", "PRECISIONS"],
    "nanops.timm": ["NativeScaler"],
    "nanops.huggingface": ["protect", "Protection"],
    "nanops.tools.doctor": ["check_labels", "check_hyp", "find_label_files", "write_fixed_copies", "DoctorError"],
    "nanops.tools.demo": ["run_demo"],
    "nanops.tools.synthetic": ["write_yolo_dataset"],
    "nanops.tools.inject": ["inject_nonfinite_input"],
    "nanops.cli": ["main"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import_from_their_documented_place(module):
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert not missing, missing


def test_yolov5_train_is_the_documented_function_and_no_module_swaps_its_class():
    import nanops
    import nanops.yolov5

    assert callable(nanops.yolov5.train) and not isinstance(nanops.yolov5.train, type(nanops))
    assert nanops.Guard is nanops.training.Guard and nanops.GradScaler is nanops.training.GradScaler
    swapped = [str(p.relative_to(PACKAGE)) for p in SOURCES if re.search(r"sys\.modules\[.*\]\.__class__ =", p.read_text())]
    assert not swapped, swapped


def test_import_nanops_loads_no_framework_code():
    import subprocess
    import sys

    code = ("import sys, nanops; nanops.all_finite([]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yolov5', 'ultralytics', 'lightning', "
            "'timm', 'transformers', 'accelerate') or m.startswith(('nanops.yolov5', 'nanops.ultralytics', "
            "'nanops.lightning', 'nanops.timm', 'nanops.huggingface', 'nanops.tools'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _wing_sources():
    return [p for p in SOURCES if _layer(_module_name(p)) == FRAMEWORK]


@pytest.mark.parametrize("path", _wing_sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_wings_use_only_public_names_of_the_layers_below(path):
    """A wing reaches training/ through `nanops.training` itself (its __init__ says what is
    public) and the ops through their public modules; nothing named with a leading underscore."""
    here = _module_name(path)
    wing = here.split(".")[:2]
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        line, target = node.lineno, _from_target(node, path)
        if target.split(".")[0] != "nanops" or target.split(".")[:2] == wing:
            continue
        parts = target.split(".")
        if len(parts) == 1:  # from nanops (or `from .. import x`): x is a module or a name
            parts = parts + [a.name for a in node.names]
        if any(part.startswith("_") for part in parts):
            wrong.append(f"{path.name}:{line} imports the private module {target}")
        if parts[1] == "training" and len(parts) > 2:
            wrong.append(f"{path.name}:{line} imports {target}: use nanops.training's public names")
        wrong += [f"{path.name}:{line} imports the private name {a.name} from {target}"
                  for a in node.names if a.name.startswith("_")]
    assert not wrong, wrong


# Private torch names (torch._x, torch.x._y, torch.x._y_module) live in _torch_private.py alone, so
# that a torch upgrade touches one file; torch._check* are documented, and _fallback's own
# checks are what the compiled ops' TORCH_CHECKs are in Python.
_PRIVATE_TORCH = re.compile(r"\btorch(?:\.[A-Za-z]\w*)*\._(?!check|_)\w+")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_torch_names_and_process_wide_hooks_live_in_one_module_each(path):
    text = path.read_text()
    rel = str(path.relative_to(PACKAGE))
    if rel != "_torch_private.py":
        found = sorted(set(_PRIVATE_TORCH.findall(text)))
        found += [f"{node.module}.{a.name}" for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ImportFrom)
                  and (node.module or "").split(".")[0] == "torch" for a in node.names if a.name.startswith("_")]
        assert not found, f"{rel} uses private torch names {found}: add them to nanops/_torch_private.py"
        assert not re.search(r"\._scale\b", text) and "_per_optimizer_states" not in text.replace(
            "self._per_optimizer_states", ""), rel
    if rel != "training/global_hooks.py":
        assert "register_module_forward" not in text and "register_module_full_backward" not in text, rel


def test_no_file_of_the_package_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_kernel_call_chooses_its_path_by_catching_a_runtime_error():
    # A kernel's failure (out of memory, a device fault) must reach the caller, never be retried.
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                assert not names & {"RuntimeError", "NotImplementedError"}, f"{path.name}:{node.lineno}"
