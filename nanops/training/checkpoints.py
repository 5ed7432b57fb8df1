"""Loading a training checkpoint without running code from it.

yolov5's and ultralytics' checkpoints pickle whole models, so torch.load's safe mode
(weights_only=True) refuses them, and with an allow-list of their classes it still lets a file
*call* an allowed class with arguments of the file's choosing: REDUCE(DetectionModel, (cfg,))
runs DetectionModel.__init__, which evaluates strings of cfg. This unpickler rebuilds a model the
way pickle rebuilds any plain object and nothing more:

  * a module object is made with object.__new__ (never __init__, never a class's own __new__)
    and gets its saved __dict__ through torch.nn.Module.__setstate__ (torch's own classes keep
    their own __setstate__: it only fills in attributes of older releases);
  * the only callables a file may call are torch's weights_only set (tensor and storage
    rebuilds, OrderedDict, torch.Size, ...), numpy's scalar/array/dtype rebuilds, pathlib's
    paths, and copyreg._reconstructor in the one form a plain object takes (cls, object, None);
  * the classes it may name are nn.Module subclasses of torch.nn, yolov5, ultralytics and nanops
    from modules already imported or on a fixed list (yolov5.models.*, ultralytics.nn.*);
    "models.x" (checkpoints of a yolov5 clone) means yolov5.models.x, never the working
    directory's own package; nothing is imported because a file names it.

Anything else is refused before any of the file's objects is built: `UntrustedCheckpoint`, one
line naming the global or the call, and the opt-out NANOPS_TRUST_CHECKPOINTS=1 (full pickle, for
files the user trusts). Tensors are read by torch.load itself (its persistent loads).
"""
from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import copyreg
import functools
import importlib
import os
import pathlib
import pickle
import sys
import types
import warnings
from collections import OrderedDict

import torch
from torch import nn

from .._torch_private import weights_only_globals

TRUST_CHECKPOINTS = "NANOPS_TRUST_CHECKPOINTS"  # =1: the documented opt-in to full unpickling

# Where the module classes of a checkpoint may come from, and the modules that may be imported to
# find them (each already a dependency of the training that reads the file).
MODULE_PREFIXES = ("torch.nn.", "yolov5.models.", "ultralytics.nn.", "nanops.")
IMPORTABLE = frozenset({
    "yolov5.models.yolo", "yolov5.models.common", "yolov5.models.experimental",
    "ultralytics.nn.tasks", "ultralytics.nn.modules", "ultralytics.nn.modules.block",
    "ultralytics.nn.modules.conv", "ultralytics.nn.modules.head", "ultralytics.nn.modules.transformer",
    "ultralytics.nn.modules.activation", "ultralytics.nn.modules.utils",
    "nanops.nn", "nanops.patching", "ultralytics.utils",
})
_RENAMED_PACKAGES = (("models.", "yolov5.models."),)  # a yolov5 clone's layout -> the package


class UntrustedCheckpoint(Exception):
    """A checkpoint names or calls something a plain model checkpoint never does. Not an
    UnpicklingError on purpose: loaders that catch those (ultralytics') would report a refused
    file as a damaged one."""


def _numpy_globals() -> dict:
    try:
        import numpy as np
    except ImportError:
        return {}
    found = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        module = sys.modules.get(core)
        if module is None:
            with contextlib.suppress(ImportError), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy 2 warns on numpy.core
                module = importlib.import_module(core)
        if module is not None:
            found[f"{core}.scalar"] = module.scalar
            found[f"{core}._reconstruct"] = module._reconstruct
    for prefix in ("numpy.dtypes", "numpy._core.dtypes"):
        for name in dir(getattr(np, "dtypes", object)):
            if name.endswith("DType"):
                found[f"{prefix}.{name}"] = getattr(np.dtypes, name)
    return found


def _numpy_types() -> set[int]:
    """ids of the numpy types whose state a checkpoint may set (dtypes, arrays): numpy's C code."""
    try:
        import numpy as np
    except ImportError:
        return set()
    kinds = {np.dtype, np.ndarray} | {type(np.dtype(c)) for c in "?bhilqBHILQefdgFDGSUV"}
    return {id(k) for k in kinds}


@functools.lru_cache(maxsize=1)
def _safe_globals() -> dict:
    """Name -> object of every global a checkpoint may hold besides module classes."""
    found = weights_only_globals()
    found.update(_numpy_globals())
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
                pathlib.Path):
        found[f"pathlib.{cls.__name__}"] = cls
    found["copyreg._reconstructor"] = copyreg._reconstructor
    found["builtins.object"] = object
    return found


# Plain attribute holders a trainer pickles its arguments in (ultralytics' args; argparse's): made
# empty (no argument a file chooses reaches them) and given their saved attributes.
NAMESPACES = frozenset({"types.SimpleNamespace", "argparse.Namespace", "ultralytics.utils.IterableSimpleNamespace"})


class LoadPolicy:
    """What a checkpoint may name and call (see the module docstring)."""

    def __init__(self) -> None:
        self.globals = _safe_globals()  # shared, read only
        self.callables = {id(v) for v in self.globals.values() if callable(v)} - {id(copyreg._reconstructor)}
        self.module_classes: set[type] = set()
        self.namespaces: set[type] = set()
        self._numpy_types = _numpy_types()

    # --- GLOBAL ---------------------------------------------------------------------------------
    def resolve(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in self.globals:
            return self.globals[qualified]
        for old, new in _RENAMED_PACKAGES:
            if module.startswith(old) and not module.startswith(new):
                module = new + module[len(old):]
        if qualified in NAMESPACES:
            namespace = self._namespace_class(module, name)
            if namespace is not None:
                self.namespaces.add(namespace)
                return namespace
        cls = self._module_class(module, name)
        if cls is None:
            raise UntrustedCheckpoint(f"it names {qualified}, which no model checkpoint holds")
        self.module_classes.add(cls)
        return cls

    def _namespace_class(self, module: str, name: str) -> type | None:
        loaded = sys.modules.get(module)
        if loaded is None and (module in IMPORTABLE or module in ("types", "argparse")):
            with contextlib.suppress(ImportError):
                loaded = importlib.import_module(module)
        cls = getattr(loaded, name, None)
        plain = (types.SimpleNamespace, argparse.Namespace)
        # Their __new__ is C's or object's, never the file's business: an override disqualifies.
        if isinstance(cls, type) and issubclass(cls, plain) and cls.__new__ in (object.__new__,
                                                                               types.SimpleNamespace.__new__):
            return cls
        return None

    def _module_class(self, module: str, name: str) -> type | None:
        if "." in name or not module.startswith(MODULE_PREFIXES):
            return None
        loaded = sys.modules.get(module)
        if loaded is None and module in IMPORTABLE:
            with contextlib.suppress(ImportError):
                loaded = importlib.import_module(module)
        cls = getattr(loaded, name, None) if loaded is not None else None
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith(MODULE_PREFIXES):
            return cls
        return None

    # --- REDUCE, NEWOBJ, BUILD ------------------------------------------------------------------
    def call(self, func, args):
        if func in self.namespaces:
            if args != ():
                raise UntrustedCheckpoint(f"it calls {_name(func)}{_short(args)}")
            return func.__new__(func)
        if func is copyreg._reconstructor:
            cls, base, state = args if isinstance(args, tuple) and len(args) == 3 else (None, None, None)
            if cls in self.module_classes and base is object and state is None:
                return object.__new__(cls)
            raise UntrustedCheckpoint(f"it calls copyreg._reconstructor{_short(args)}, not the plain-object form "
                                      "(module class, object, None)")
        if id(func) not in self.callables:
            raise UntrustedCheckpoint(f"it calls {_name(func)}{_short(args)}: a checkpoint's models are rebuilt "
                                      "without calling their classes")
        return func(*args)

    def new(self, cls, args):
        if cls in self.namespaces and not args:
            return cls.__new__(cls)
        if cls in self.module_classes:
            if args:
                raise UntrustedCheckpoint(f"it calls {_name(cls)}.__new__ with arguments {_short(args)}")
            return object.__new__(cls)
        if cls is nn.Parameter:
            return nn.Parameter(*args)
        if id(cls) in self.callables and isinstance(cls, type):
            return cls.__new__(cls, *args)
        raise UntrustedCheckpoint(f"it creates a {_name(cls)}")

    def build(self, inst, state) -> None:
        kind = type(inst)
        if kind is torch.Tensor:
            inst.set_(*state)
        elif kind is nn.Parameter:
            inst.__setstate__(state)
        elif kind in self.module_classes:
            if not isinstance(state, dict):
                raise UntrustedCheckpoint(f"it gives a {_name(kind)} the state {_short(state)}, not a dict")
            setstate = kind.__setstate__
            owner = next((c for c in kind.__mro__ if "__setstate__" in c.__dict__), nn.Module)
            if owner.__module__.startswith("torch."):
                setstate(inst, state)  # torch's own: fills in attributes older releases lacked
            else:
                nn.Module.__setstate__(inst, state)  # a library class's own __setstate__ is not run
        elif kind is OrderedDict or kind in self.namespaces:
            if not isinstance(state, dict):
                raise UntrustedCheckpoint(f"it gives a {_name(kind)} the state {_short(state)}, not a dict")
            inst.__dict__.update(state)
        elif id(kind) in self._numpy_types:
            inst.__setstate__(state)  # numpy's C rebuild of a dtype or an array
        else:
            raise UntrustedCheckpoint(f"it sets the state of a {_name(kind)}")


def _name(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class SafeUnpickler(pickle._Unpickler):
    """pickle's own (Python) unpickler with GLOBAL, REDUCE, NEWOBJ and BUILD going through a
    LoadPolicy, and the opcodes a plain checkpoint never uses (INST, OBJ, extensions) refused."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self.policy = LoadPolicy()

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle's own find_class maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        return self.policy.resolve(module, name)

    def _reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self.policy.call(self.stack[-1], args)

    def _newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.policy.new(cls, args))

    def _newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise UntrustedCheckpoint(f"it creates a {_name(cls)} with keyword arguments")
        self.append(self.policy.new(cls, args))

    def _build(self):
        state = self.stack.pop()
        self.policy.build(self.stack[-1], state)

    def _refuse(self):
        raise UntrustedCheckpoint("it uses a pickle instruction (INST, OBJ or an extension code) that makes "
                                  "objects no model checkpoint holds")

    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.NEWOBJ[0]] = _newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _newobj_ex
    dispatch[pickle.BUILD[0]] = _build
    for _opcode in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = _refuse
    del _opcode


def _safe_load(file, **kwargs):
    return SafeUnpickler(file, **kwargs).load()


# torch.load's pickle_module: its Unpickler for the zip format, and load for the legacy one.
safe_pickle = types.ModuleType("nanops_safe_pickle")
safe_pickle.Unpickler = SafeUnpickler
safe_pickle.load = _safe_load
safe_pickle.UnpicklingError = pickle.UnpicklingError
safe_pickle.__doc__ = "pickle with nanops' checkpoint policy (nanops.training.checkpoints)"


def _describe(f) -> str:
    return str(getattr(f, "name", f))


def load(f, *args, torch_load=None, **kwargs):
    """torch.load(f) of a checkpoint under the policy above (or trusting it entirely with
    NANOPS_TRUST_CHECKPOINTS=1, with a warning naming the file). Raises UntrustedCheckpoint,
    whose message names the file, what it names, and the opt-out. An explicit weights_only=True
    keeps torch's own, stricter load."""
    torch_load = torch_load or torch.load
    kwargs.pop("pickle_module", None)
    weights_only = kwargs.pop("weights_only", None)
    if weights_only is True:
        return torch_load(f, *args, weights_only=True, **kwargs)
    if os.environ.get(TRUST_CHECKPOINTS) == "1":
        warnings.warn(f"nanops: {TRUST_CHECKPOINTS}=1: unpickling {_describe(f)} with no restriction", stacklevel=3)
        return torch_load(f, *args, weights_only=False, **kwargs)
    try:
        return torch_load(f, *args, weights_only=False, pickle_module=safe_pickle, **kwargs)
    except UntrustedCheckpoint as err:
        if str(err).startswith("nanops: refusing"):
            raise  # from a nested load (two policies in force): already names the file
        raise UntrustedCheckpoint(
            f"nanops: refusing to load {_describe(f)}: {err}. Checkpoints are loaded without running code from "
            f"them; if you trust this file, set {TRUST_CHECKPOINTS}=1") from None


@contextlib.contextmanager
def checkpoint_loading():
    """Inside, every torch.load (yolov5's train.py, val and attempt_load; ultralytics' loaders,
    which pass weights_only=False) loads under the policy above: their own checkpoints load,
    a crafted one is refused before any of it runs."""
    original = torch.load

    def guarded_load(f, *args, **kwargs):
        return load(f, *args, torch_load=original, **kwargs)

    torch.load = guarded_load
    try:
        yield
    finally:
        torch.load = original
