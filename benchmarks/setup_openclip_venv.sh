#!/usr/bin/env bash
# Builds the reference virtualenv for open_clip_train's own webdataset loader (run once, ~2 min).
# open_clip_train needs webdataset <= 0.2.86 (with 1.0.2 its shard reader fails on the end-of-shard marker:
# KeyError 'fname'), so it cannot share the project's venv.
#   bash benchmarks/setup_openclip_venv.sh [VENV_DIR]     (default /tmp/bench/openclip-venv)
set -euo pipefail
VENV="${1:-/tmp/bench/openclip-venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import open_clip_train.data, webdataset" 2>/dev/null; then
  echo "reference venv ready: $VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch from the local wheels (pip only; uv/poetry would download ~3 GB).
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q open_clip_torch webdataset==0.2.86 pandas braceexpand torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -c "import open_clip, webdataset, open_clip_train.data as d; print('open_clip', open_clip.__version__, 'webdataset', webdataset.__version__)"
echo "reference venv ready: $VENV"
