#!/usr/bin/env bash
# Builds the img2dataset virtualenv for benchmarks/data_prep_vs_img2dataset.py (run once, ~1 min).
# img2dataset's pins (albumentations, opencv, fire, ...) do not belong in the project's venv.
#   bash benchmarks/setup_img2dataset.sh [VENV_DIR]     (default /tmp/bench/img2dataset-venv)
set -euo pipefail
VENV="${1:-/tmp/bench/img2dataset-venv}"
if [ -x "$VENV/bin/img2dataset" ] && NO_ALBUMENTATIONS_UPDATE=1 "$VENV/bin/python" -c "import img2dataset" 2>/dev/null; then
  echo "img2dataset venv ready: $VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
# This venv only: the machine-wide pip constraints (torch caps for the project) do not apply to it.
PIP_CONSTRAINT= "$VENV/bin/python" -m pip install -q img2dataset==1.47.0  # pinned: figures across days compare (2026-12-02)
NO_ALBUMENTATIONS_UPDATE=1 "$VENV/bin/python" -c "import importlib.metadata as m; print('img2dataset', m.version('img2dataset'))"
echo "img2dataset venv ready: $VENV"
