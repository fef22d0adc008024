"""One unit and one name per number (README "Metrics"): keys of older run dirs read under today's names,
percent shown only to people, and one autocast helper in the library."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.metrics import as_text, from_legacy

REPO = Path(__file__).resolve().parent.parent


def test_legacy_rows_get_todays_keys_and_fractions():
    row = {"step": 40, "time_utc": "t", "epoch": 1.5, "loss": 0.5, "lr": 0.1, "samples_per_second": 90.0,
           "data_wait_fraction": 0.2, "skipped_samples": {"no cls": 2}, "val_top1": 87.5, "val_top5": 100.0,
           "val_loss": 0.4, "val_samples": 360, "val_expected_samples": 360, "val_ema_top1": 50.0,
           "val_ema_samples": 360, "val_zeroshot_digits_acc1": 0.9, "something_new": 3}
    assert from_legacy(row) == {
        "step": 40, "time_utc": "t", "epoch": 1.5, "train/loss": 0.5, "train/lr": 0.1,
        "train/samples_per_second": 90.0, "train/data_wait_fraction": 0.2, "train/skipped_samples": {"no cls": 2},
        "val/top1": 0.875, "val/top5": 1.0, "val/loss": 0.4, "val/samples": 360, "val/expected_samples": 360,
        "val/ema/top1": 0.5, "val/ema/samples": 360, "val/zeroshot/digits/acc1": 0.9, "something_new": 3}


def test_todays_rows_pass_unchanged():
    row = {"step": 8, "epoch": 0.5, "train/loss": 2.0, "val/top1": 0.75, "val/zeroshot/a_b/acc1": 0.5,
           "checkpoint": "runs/x/checkpoints/step_00000008"}
    assert from_legacy(row) == row


@pytest.mark.parametrize("key, value, shown", [
    ("val/top1", 0.7531, "75.31%"), ("val/ema/top5", 1.0, "100.00%"), ("val/zeroshot/digits/acc1", 0.5, "50.00%"),
    ("val/image_retrieval_recall@5", 0.25, "25.00%"), ("train/loss", 0.123456, "0.1235"), ("val/samples", 360, "360"),
])
def test_people_read_accuracies_in_percent(key, value, shown):
    assert as_text(key, value) == shown


def test_one_autocast_helper():
    """Training tasks, a distillation teacher, validation and launch eval all enter pipeline.precision.autocast."""
    found = [str(path.relative_to(REPO)) for folder in ("pipeline", "launch")
             for path in sorted((REPO / folder).rglob("*.py"))
             for line in path.read_text().splitlines() if re.search(r"torch\.(amp\.|cuda\.amp\.)?autocast\(", line)]
    assert found == ["pipeline/precision.py"], found
