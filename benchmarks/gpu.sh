#!/usr/bin/env bash
# GPU goal (issue 8): run once on the lent H100 machine, read $OUT/gpu.jsonl, then change code.
#   run(command="bash benchmarks/gpu.sh shared/wheels", carry=["shared/wheels"]) -- see the device README.
# The GPU machine has torch/torchvision/timm/numpy/pyarrow but no deepspeed, ray, webdataset or open_clip
# and no package index: bring wheels (ENVIRONMENT.md, ~7 MB):
#   pip download --no-deps -d shared/wheels webdataset braceexpand open_clip_torch ftfy wcwidth hjson \
#       annotated_types typing_inspection 'typing_extensions>=4.16' && \
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d shared/wheels pydantic pydantic_core && \
#   pip wheel --no-deps -w shared/wheels deepspeed==0.19.8
# Ray does not travel (79 MB): the cases run our per-worker loop without Ray (launch pretrain --no-ray).
# Every case has its own time limit; a failed case writes an error line and the next one runs.
set -u
WHEELS=${1:-shared/wheels}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1 || echo '{"error": "pip install failed, see pip.log"}' >> "$OUT/gpu.jsonl"
python3 -m pip install --no-deps --no-build-isolation -e . >> "$OUT/pip.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu_info.txt" 2>&1
timeout 240 python3 benchmarks/make_image_text_shards.py --output /tmp/gpu_shards --samples 8000 --shards 32 --labels 1000 > "$OUT/shards.log" 2>&1
run() { timeout "$1" python3 benchmarks/gpu_cases.py --out "$OUT/gpu.jsonl" --shards /tmp/gpu_shards "${@:2}" || echo "{\"case\": \"$3\", \"error\": \"timeout or crash (rc $?)\"}" >> "$OUT/gpu.jsonl"; }
run 120 --case resnet50_torch
run 240 --case resnet50_ours
run 120 --case clip_b32_torch
run 240 --case clip_b32_ours
run 120 --case loader --workers 14
cat "$OUT/gpu.jsonl"
