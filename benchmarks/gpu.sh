#!/usr/bin/env bash
# GPU measurements (issues 8 and 15): one call on the lent H100/H200 machine, then read $OUT/gpu.jsonl.
#   run(command="bash benchmarks/gpu.sh .whl", carry=[".whl"], timeout_s=590) -- see the device README.
# The GPU machine has torch/torchvision/timm/numpy/pyarrow but no deepspeed, ray, webdataset or open_clip
# and no package index: `bash benchmarks/fetch_gpu_wheels.sh` brings wheels (~7 MB) into .whl/, i.e.:
#   pip download --no-deps -d .whl webdataset==1.0.2 braceexpand open_clip_torch==3.3.0 ftfy wcwidth hjson \
#       annotated_types typing_inspection 'typing_extensions>=4.16' && \
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic pydantic_core && \
#   pip wheel --no-deps -w .whl deepspeed==0.19.8
# Ray does not travel (79 MB): the cases run our per-worker loop without Ray (launch pretrain --no-ray).
# Every case has its own time limit and the whole script a budget (GPU_BUDGET_S): the cases run in order of
# value and a case that would not fit in what is left is recorded as skipped. A failed case writes an error
# line and the next one runs.
set -u
WHEELS=${1:-.whl}
OUT=${OUT:-/tmp/gpu_out}
BUDGET_S=${GPU_BUDGET_S:-560}
STEPS=${GPU_STEPS:-45}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1 \
    || echo '{"error": "pip install failed, see pip.log"}' >> "$OUT/gpu.jsonl"
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, timm, deepspeed, open_clip; print(torch.__version__, timm.__version__, deepspeed.__version__, open_clip.__version__)"; } > "$OUT/gpu_info.txt" 2>&1
timeout 120 python3 benchmarks/make_image_text_shards.py --output /tmp/gpu_shards --samples 6144 --shards 32 \
    --labels 1000 --processes 16 > "$OUT/shards.log" 2>&1
fits() {  # fits LIMIT_S CASE: whether the case fits in what is left of the budget (else it is recorded skipped)
    local left=$((BUDGET_S - ($(date +%s) - START)))
    [ "$left" -ge "$1" ] && return 0
    echo "{\"case\": \"$2\", \"skipped\": \"budget: ${left}s left, case limit $1s\"}" >> "$OUT/gpu.jsonl"
    return 1
}
run() {  # run LIMIT_S ARGS...: one training or loader case (benchmarks/gpu_cases.py)
    local limit=$1; shift
    fits "$limit" "$2${3:+ $3}" || return
    timeout "$limit" python3 benchmarks/gpu_cases.py --out "$OUT/gpu.jsonl" --shards /tmp/gpu_shards \
        --steps "$STEPS" "$@" >> "$OUT/cases.log" 2>&1 \
        || echo "{\"case\": \"$2${3:+ $3}\", \"error\": \"timeout or crash (rc $?), see cases.log\"}" >> "$OUT/gpu.jsonl"
}
run_eval() {  # run_eval LIMIT_S SIDE: zero-shot eval, bf16: ours (launch eval --amp) or CLIP_benchmark's loop
    fits "$1" "eval_zeroshot_$2" || return
    timeout "$1" python3 benchmarks/gpu_eval.py --side "$2" --shards /tmp/gpu_shards --out "$OUT/gpu.jsonl" \
        --workers 15 >> "$OUT/cases.log" 2>&1 \
        || echo "{\"case\": \"eval_zeroshot_$2\", \"error\": \"timeout or crash (rc $?), see cases.log\"}" >> "$OUT/gpu.jsonl"
}
# --profile: torch.profiler over 4 warm steps of each (pipeline/profiling.py): where our step's time goes
# beside the reference's (2026-11-30: ours 0.77-0.88x of the eager reference, compile gained nothing).
run 70 --case resnet50_torch --profile
run 120 --case resnet50_ours --profile
run 70 --case clip_b32_torch --profile
run 120 --case clip_b32_ours --profile
run 60 --case loader --workers 15
run_eval 60 ours
run_eval 60 reference
run 150 --case resnet50_ours --compile
run 100 --case resnet50_torch --compile
run 150 --case clip_b32_ours --compile
run 100 --case clip_b32_torch --compile
# At most 8 files come back from $OUT: the profiles' tables in one text file, their traces in one archive.
for dir in "$OUT"/profile_*; do
    [ -d "$dir" ] || continue
    { echo "## $(basename "$dir")"; cat "$dir/summary.json" "$dir/top_ops.txt"; } >> "$OUT/profiles.txt" 2>&1
done
if ls -d "$OUT"/profile_* > /dev/null 2>&1; then
    tar czf "$OUT/profile_traces.tgz" -C "$OUT" $(cd "$OUT" && ls -d profile_*) && rm -rf "$OUT"/profile_*
fi
cat "$OUT/gpu.jsonl"
