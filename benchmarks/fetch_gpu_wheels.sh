#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh installs on the lent GPU machine (Python 3.12, no package index there), fetched
# here into .whl/ (ignored through .git/info/exclude; ~7 MB, carried with `carry=[".whl"]`):
#   bash benchmarks/fetch_gpu_wheels.sh && run(command="bash benchmarks/gpu.sh .whl", carry=[".whl"], timeout_s=590)
# The machine has torch/torchvision/timm/numpy/pyarrow already; Ray does not travel (79 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PIP="${PIP:-.venv/bin/python -m pip}"
$PIP download -q --no-deps -d .whl webdataset==1.0.2 braceexpand open_clip_torch==3.3.0 ftfy wcwidth hjson \
    annotated_types typing_inspection 'typing_extensions>=4.16'
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic pydantic_core
[ -n "$(ls .whl/deepspeed-0.19.8-*.whl 2>/dev/null)" ] || $PIP wheel -q --no-deps -w .whl deepspeed==0.19.8
ls -l .whl
