"""yolov5 models nanops builds and ships: the yolov5s-transformer of the yolov5 package."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path

from .shims import prepare_environment


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


def base_model_type() -> type:
    """yolov5's BaseModel (every yolov5 detection and classification model derives from it)."""
    prepare_environment()
    from yolov5.models.yolo import BaseModel

    return BaseModel
