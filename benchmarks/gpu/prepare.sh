#!/usr/bin/env bash
# Run here (with network) before a GPU session: the wheels benchmarks/gpu/check.sh installs on a
# GPU machine that has no network (its image has torch 2.11, Python 3.12, numpy, pandas, opencv,
# matplotlib, scipy, seaborn, pytest..., but not yolov5 and what yolov5/ultralytics import at
# start). They go to .whl/ (ignored by git, carried with the device call: about 4 MB).
# Found by importing yolov5's train/val/detect/export and ultralytics' trainer in a venv holding
# only what the GPU image holds, adding the package each ImportError named.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$@"
}
download yolov5==7.0.14 ultralytics==8.4.190 ultralytics-thop==2.2.3 roboflow==1.7.3 requests-toolbelt==1.0.0 \
  python-dotenv==1.2.4 pillow-avif-plugin==1.6.0 expecttest==0.3.0 setuptools==80.9.0
ls -la .whl
du -sh .whl
