"""Quiet, offline import of the `yolov5` package (our compatibility reference)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from pathlib import Path


def prepare_environment() -> None:
    """Keeps ultralytics/yolov5 offline and writing only under a cache folder of ours."""
    cache = Path(os.environ.get("NANOPS_CACHE", Path.home() / ".cache" / "nanops"))
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    for var in ("YOLO_CONFIG_DIR", "YOLOV5_CONFIG_DIR", "MPLCONFIGDIR"):
        os.environ.setdefault(var, str(cache))
    _provide_font(Path(os.environ["YOLOV5_CONFIG_DIR"]))
    _restore_removed_apis()


def _restore_removed_apis() -> None:
    """yolov5 7.0.14 calls what newer releases of its dependencies removed: NumPy 2.4's np.trapz
    (validation's mAP), Pillow 10's FreeTypeFont.getsize (plot labels) and huggingface_hub's
    private module utils._errors (imported by every train.py run, for the exception classes that
    now live in huggingface_hub.errors). Each is given back under its old name, pointing at its
    successor, so `nanops train` runs on what a current environment (a GPU image, say) has;
    nothing else changes."""
    import importlib
    import sys

    import numpy as np

    if not hasattr(np, "trapz") and hasattr(np, "trapezoid"):
        np.trapz = np.trapezoid
    try:
        from PIL import ImageFont
    except ImportError:
        ImageFont = None
    if ImageFont is not None and not hasattr(ImageFont.FreeTypeFont, "getsize"):
        def getsize(font, text, *args, **kwargs):
            left, top, right, bottom = font.getbbox(text, *args, **kwargs)
            return right - left, bottom - top

        ImageFont.FreeTypeFont.getsize = getsize
    if "huggingface_hub.utils._errors" not in sys.modules:
        try:
            importlib.import_module("huggingface_hub.utils._errors")
        except ModuleNotFoundError:
            try:
                sys.modules["huggingface_hub.utils._errors"] = importlib.import_module("huggingface_hub.errors")
            except ImportError:
                pass  # no huggingface_hub at all: yolov5 reports that itself


TRUST_CHECKPOINTS = "NANOPS_TRUST_CHECKPOINTS"  # =1: the documented opt-in to full unpickling

# Prefixes of the modules whose nn.Module classes a yolov5 checkpoint pickles (yolov5's own
# layers, torch's, and the repository layout "models.*"/"utils.*" of checkpoints written by a
# yolov5 clone); any other global must be one of the few plain-data reconstructors below.
_MODULE_PREFIXES = ("torch.nn.", "yolov5.", "models.", "utils.", "ultralytics.", "nanops.")
_DATA_GLOBALS = {
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "pathlib.PosixPath",
    "pathlib.PurePosixPath",
    # copyreg's reconstructor of a patched attention module (pickled as the class it was built as)
    "copyreg._reconstructor", "builtins.object",
}


def _resolve(name: str):
    module_name, _, attr = name.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        return None


def _allowed_global(name: str):
    """The object `name` stands for when a yolov5 checkpoint may hold it, else None."""
    if name in _DATA_GLOBALS or name.startswith(("numpy.dtypes.", "numpy._core.dtypes.")):
        return _resolve(name)
    if name.startswith(_MODULE_PREFIXES):
        import torch

        obj = _resolve(name)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            return obj
    return None


def _numpy_scalar_globals() -> list:
    """What unpickling a numpy scalar needs (its reconstructor, dtype and dtype classes); the
    unpickler meets the dtype classes through the dtype's state, so a file's global list does
    not always name them."""
    import numpy as np

    found = [_resolve(n) for n in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")]
    found += [np.dtype] + [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    return [obj for obj in found if obj is not None]


@contextlib.contextmanager
def checkpoint_loading():
    """Inside, torch.load keeps torch's safe default (weights_only=True) with exactly the classes
    a yolov5 checkpoint holds allow-listed for that file: yolov5's train.py, val and attempt_load
    (which call torch.load without weights_only) load yolov5's own last.pt/best.pt/--weights,
    and a file naming anything else (os.system in a crafted __reduce__, say) is refused before
    anything in it runs. NANOPS_TRUST_CHECKPOINTS=1 is the opt-in to full unpickling (with a
    warning naming each file); an explicit weights_only=False in a call is its caller's choice."""
    import pickle

    import torch

    original = torch.load

    def load(f, *args, weights_only=None, **kwargs):
        if weights_only is False:
            return original(f, *args, weights_only=False, **kwargs)
        if os.environ.get(TRUST_CHECKPOINTS) == "1":
            warnings.warn(f"nanops: {TRUST_CHECKPOINTS}=1: unpickling {f} with no restriction", stacklevel=2)
            return original(f, *args, weights_only=False, **kwargs)
        position = f.tell() if hasattr(f, "tell") else None
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception:
            names = []  # not a zip checkpoint: torch's own weights_only load decides
        if position is not None:
            f.seek(position)
        allowed = _numpy_scalar_globals()  # best_fitness and the like are numpy scalars
        for name in names:
            obj = _allowed_global(name)
            if obj is None:
                raise pickle.UnpicklingError(
                    f"nanops: refusing to load {f}: it names {name}, which no yolov5 checkpoint holds (torch's "
                    f"weights_only rule, kept by nanops). If you trust this file, set {TRUST_CHECKPOINTS}=1")
            allowed.append(obj)
        with torch.serialization.safe_globals(allowed):
            return original(f, *args, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _provide_font(config_dir: Path) -> None:
    """yolov5's plots download Arial.ttf on first use (no network here): any TTF will do, and
    matplotlib ships DejaVuSans."""
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = config_dir / name
        if target.exists():
            continue
        try:
            import matplotlib

            source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
            config_dir.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
        except (ImportError, OSError):
            return  # plots then fail as in plain yolov5 offline; --noplots avoids them


def quiet_yolov5_import(module: str):
    """Imports a yolov5 module without the banner ultralytics prints on first import."""
    import importlib

    prepare_environment()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


def import_yolov5_common():
    """yolov5.models.common, imported without its banner noise."""
    return quiet_yolov5_import("yolov5.models.common")


def transformer_yaml() -> Path:
    """Path of models/hub/yolov5s-transformer.yaml inside the installed yolov5 package."""
    spec = importlib.util.find_spec("yolov5")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `yolov5` package is not installed: pip install yolov5==7.0.14")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "hub" / "yolov5s-transformer.yaml"


def build_transformer_model(num_classes: int = 80):
    """A randomly initialised yolov5s-transformer `Model` from the yolov5 package (no downloads)."""
    prepare_environment()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from yolov5.models.yolo import Model
        from yolov5.utils.general import LOGGER

        level = LOGGER.level
        LOGGER.setLevel("ERROR")
        try:
            model = Model(str(transformer_yaml()), ch=3, nc=num_classes)
        finally:
            LOGGER.setLevel(level)
    return model
