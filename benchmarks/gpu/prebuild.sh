#!/usr/bin/env bash
# Run here (with network) before a GPU session: builds nanops/_C for the GPU machine's Python
# 3.12 and torch 2.11.0 (CUDA 13.0, sm_90a as its TORCH_CUDA_ARCH_LIST says) into .prebuilt/,
# with a hash of the sources it was built from. check.sh loads it when the hash matches the
# tree it runs on, which saves the two-minute build of device time; otherwise it builds there.
#   PYTHON312=/path/to/python3.12 benchmarks/gpu/prebuild.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY312=${PYTHON312:-$(command -v python3.12)}
VENV=${PREBUILD_VENV:-/tmp/nanops-prebuild-py312}
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.11.0')" 2>/dev/null || {
  "$VENV/bin/pip" install -q --no-deps torch==2.11.0   # PyPI's Linux wheel is the CUDA 13.0 build
  "$VENV/bin/pip" install -q numpy "setuptools<82" ninja typing_extensions filelock sympy networkx jinja2 fsspec
}
# torch imports its CUDA libraries at import time; a build needs no GPU, only the libraries: take
# them from the nvidia-* wheels of any Python of this machine.
NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null)/nvidia
export LD_LIBRARY_PATH=$(ls -d "$NV"/*/lib "$NV"/cu13/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
WORK=$(mktemp -d)
git ls-files -z | xargs -0 tar cf - | tar xf - -C "$WORK"
(cd "$WORK" && MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0a NANOPS_CUDA=1 "$VENV/bin/python" setup.py -q build_ext --inplace)
mkdir -p .prebuilt
rm -f .prebuilt/_C.*.so
cp "$WORK"/nanops/_C.cpython-312-*.so .prebuilt/
strip --strip-debug .prebuilt/_C.*.so
bash benchmarks/gpu/source_hash.sh > .prebuilt/SOURCES.sha256
rm -rf "$WORK"
ls -la .prebuilt
