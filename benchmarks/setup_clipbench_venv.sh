#!/usr/bin/env bash
# Builds the reference virtualenv for CLIP_benchmark (`clip_benchmark eval`), run once (~2-3 min).
# CLIP_benchmark pins its own webdataset / open_clip ranges, so it gets a venv of its own.
#   bash benchmarks/setup_clipbench_venv.sh [VENV_DIR]     (default /tmp/bench/clipbench-venv)
set -euo pipefail
VENV="${1:-/tmp/bench/clipbench-venv}"
check() { "$VENV/bin/python" -c "import clip_benchmark.cli, clip_benchmark.datasets.builder, open_clip, webdataset" 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && check; then
  echo "reference venv ready: $VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch from the local wheels (pip only; the pinned versions are found on disk, not downloaded).
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
if ! "$VENV/bin/python" -m pip install -q clip_benchmark open_clip_torch requests torch==2.14.1 torchvision==0.29.1; then
  # Its optional extras (COCO captioning metrics, multilingual models) may not resolve: install the
  # package alone plus what `clip_benchmark eval` on a wds zero-shot set imports.
  echo "clip_benchmark's dependencies did not resolve; installing it with --no-deps" >&2
  "$VENV/bin/python" -m pip install -q --no-deps clip_benchmark
  "$VENV/bin/python" -m pip install -q open_clip_torch webdataset scikit-learn tqdm pandas pycocotools requests \
    torch==2.14.1 torchvision==0.29.1
fi
# clip_benchmark 1.6.x calls float() on 1-element arrays (its accuracy()), which NumPy 2.4 turned into
# a TypeError: keep NumPy below 2.4 in this venv.
"$VENV/bin/python" -m pip install -q "numpy<2.4"
check || { echo "reference venv incomplete: $VENV" >&2; exit 1; }
"$VENV/bin/python" -c "import importlib.metadata as m; print('clip_benchmark', m.version('clip_benchmark'), 'open_clip', m.version('open_clip_torch'), 'webdataset', m.version('webdataset'), 'torch', m.version('torch'))"
echo "reference venv ready: $VENV"
