"""Builds nanops._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Environment:
  NANOPS_CUDA=0/1         force the CUDA kernels off/on (default: auto-detect)
  TORCH_CUDA_ARCH_LIST    GPU architectures. Unset: on a machine with a GPU, that GPU's (torch's own
                          rule); without one (CI, a wheel for others), DEFAULT_ARCHS: cubins for
                          Turing, Ampere/Ada and Hopper, PTX of Hopper for newer GPUs (Blackwell)
  NANOPS_DEBUG=1          -O0 -g builds
  NANOPS_FRESH_BUILD=1    compile in a temporary folder instead of reusing ./build/obj

A failed compile does not fail the install: nanops then runs every op on its PyTorch fallback
(nanops/_fallback.py) and says so when imported.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# T4 / GTX 16xx / RTX 20xx; A100 (8.6 and 8.9 run the 8.0 cubin); H100/H200; PTX for newer GPUs.
DEFAULT_ARCHS = "7.5;8.0;9.0+PTX"


def _cuda_home() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _want_cuda(torch) -> bool:
    forced = os.environ.get("NANOPS_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and _cuda_home() is not None


def _extension():
    import torch
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch)
    if with_cuda:
        # Must be set before cpp_extension resolves nvcc; torch otherwise guesses /usr/local.
        os.environ.setdefault("CUDA_HOME", _cuda_home() or "")
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

    # One source list for every build: the same globs drive CMakeLists.txt.
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        # Kernels in .cu (nvcc; no torch headers, see csrc/cuda/launch.h), their host sides in .cpp.
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))

    debug = os.environ.get("NANOPS_DEBUG") == "1"
    # Python's own CFLAGS carry -g: debug info of torch's headers costs a third of the C++ compile
    # time (and most of the library's size), so a release build turns it off.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fopenmp: ATen's at::parallel_for is an inline `#pragma omp parallel`; without the flag
    # every CPU kernel would silently run on one thread.
    # -Wno-psabi: torch's vec256 headers return 256-bit vectors from inline helpers; GCC notes the
    # ABI differs from non-AVX code, which never matters here (each ISA copy calls only itself).
    cxx_flags = opt + ["-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas",
                       "-Wno-psabi"]
    # --threads: nvcc compiles a file's architectures side by side, so the longest kernel file does
    # not run alone on one core at the end of the build.
    nvcc_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["--expt-relaxed-constexpr", "-lineinfo", "--threads", "3",
                                                          "-Xcompiler=-Wall,-fopenmp"]
    define_macros = [("NANOPS_WITH_CUDA", "1")] if with_cuda else []

    include_dirs = [os.path.join(ROOT, "csrc"), ROOT]  # ROOT: csrc/ops.cpp includes nanops/ops.def
    print(f"nanops build: cuda={with_cuda} arch={os.environ.get('TORCH_CUDA_ARCH_LIST')} "
          f"debug={debug} sources={len(sources)}")
    ext_type = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return ext_type(
        name="nanops._C",
        optional=True,  # no compiler, a failed compile: nanops installs and runs its fallback
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class BuildInTree(BuildExtension):
        """Object files in ./build/ of the checkout, not a fresh temporary folder: pip's editable
        installs otherwise recompile every source on each `pip install -e .` (the README's
        second command right after the first); ninja now rebuilds only what changed."""

        def finalize_options(self):
            super().finalize_options()
            if not os.environ.get("NANOPS_FRESH_BUILD"):
                self.build_temp = os.path.join(ROOT, "build", "obj")

        def build_extension(self, ext):
            # setuptools sorts the sources, and ninja starts jobs in that order: the kernel files,
            # the longest jobs, would start last and run alone at the end. Largest first instead
            # (on two cores that is a minute of the first install).
            compile_sources = self.compiler.compile

            def longest_first(sources, *args, **kwargs):
                return compile_sources(sorted(sources, key=lambda f: (not f.endswith(".cu"), -os.path.getsize(f))),
                                       *args, **kwargs)

            self.compiler.compile = longest_first
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_sources

        def build_extensions(self):
            # The extension is optional, but torch checks the compiler before building any
            # extension (outside setuptools' per-extension `optional` handling): a machine
            # without a working compiler gets the package and its PyTorch fallback.
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001  (any failure to compile: install without _C)
                print(f"nanops: the compiled kernels could not be built ({type(err).__name__}: {err}); installing "
                      "without them: every op runs its PyTorch fallback (same results, slower)")

    return BuildInTree.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    name="nanops",
    version="0.1.0",
    description="Fused NaN/Inf detection, stable softmax and grad clipping kernels for Transformer-YOLOv5 training",
    # The benchmark scripts ship too (as `nanops_benchmarks`), so `nanops bench` works from a wheel.
    packages=find_packages(include=["nanops", "nanops.*"]) + ["nanops_benchmarks"],
    # ops.def: the op schemas (the fallback defines the ops from it); the ultralytics C3TR config.
    package_data={"nanops": ["ops.def", "ultralytics/cfg/*.yaml"]},
    package_dir={"nanops_benchmarks": "benchmarks"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
    entry_points={"console_scripts": ["nanops=nanops.cli:main"]},
    python_requires=">=3.10",
    # Tested: torch 2.11 (the GPU machines' build, CUDA 13) and 2.14.1 (CI); the whole suite
    # passes on both. Older releases lack the 32 KB kernel-parameter launch tables' CUDA 12.1+.
    install_requires=["torch>=2.11", "pyyaml", "numpy"],
    # `pip install nanops[yolov5]`: the yolov5 stack of `nanops train/demo/check`, with the pins it
    # needs (setuptools < 81 keeps pkg_resources; numpy < 2.4 keeps np.trapz; pillow < 10 keeps getsize).
    extras_require={
        "yolov5": ["yolov5==7.0.14", "setuptools>=77.0.3,<81", "numpy>=2,<2.4", "pillow<10", "matplotlib"],
        "export": ["onnx", "onnxscript"],
    },
    zip_safe=False,
)
