"""What yolov5 7.0.14 needs from its environment: offline, quiet imports, and the APIs newer
releases of its dependencies removed, given back under their old names."""
from __future__ import annotations

import contextlib
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


def yolov5_callbacks(owner, hooks) -> object:
    """A yolov5 Callbacks object with `owner`'s methods of these names registered (as "nanops")."""
    from yolov5.utils.callbacks import Callbacks

    callbacks = Callbacks()
    for hook in hooks:
        callbacks.register_action(hook, name="nanops", callback=getattr(owner, hook))
    return callbacks
