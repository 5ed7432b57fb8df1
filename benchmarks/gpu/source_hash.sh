#!/usr/bin/env bash
# One hash of everything nanops/_C is built from (prebuild.sh writes it, check.sh compares it).
cd "$(dirname "$0")/../.."
find csrc setup.py nanops/ops.def -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name 'setup.py' \
  -o -name 'ops.def' \) \
  -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
