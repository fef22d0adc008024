"""`launch report RUN_DIR`: plots and summary of a run dir written by hand here (no Ray, no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from launch.cli import main

REVISION = "0123456789abcdef0123456789abcdef01234567"
CONFIG_YAML = """\
# resolved from configs/smoke_resnet.yaml
run:
  name: fake_resnet
  output_dir: runs
  seed: 3
data:
  train: /data/digits/train
  val: /data/digits/val
  batch_size_per_rank: 32
  global_batch_size: null
  image_size_px: 64
model:
  kind: classifier
  name: resnet18
optim:
  name: sgd
  lr: 0.2
  weight_decay: 0.0001
schedule:
  kind: cosine
  epochs: 4.0
  max_steps: null
deepspeed:
  zero_stage: 2
  precision: fp32
  gradient_accumulation_steps: 2
ray:
  num_workers: 2
"""


def _row(step: int) -> dict:
    row = {"step": step, "time_utc": f"2026-01-01T00:{step // 10:02d}:00Z", "train/loss": 2.3 * math.exp(-step / 40),
           "train/samples_per_second": 250.0 + step, "train/data_wait_seconds": 0.1,
           "train/data_wait_fraction": 0.05, "epoch": round(step / 30, 3), "train/lr": 0.2 * (1 - step / 120)}
    if step in (20, 70):
        row["train/skipped_samples"] = {"undecodable jpg": 3, "no cls": 1}
    if step == 90:
        row["train/skipped_samples"] = {"undecodable jpg": 4}
    if step % 40 == 0:
        row.update({"val/top1": 0.5 + step / 1000, "val/top5": 0.8 + step / 2000, "val/loss": 1.5 - step / 200,
                    "val/ema/top1": 0.45 + step / 1000, "val/samples": 360})
    return row


def _final_row() -> dict:
    return {"step": 120, "time_utc": "2026-01-01T00:12:00Z", "train/loss": 0.11487,
            "train/samples_per_second": 371.25, "train/data_wait_seconds": 0.1, "train/data_wait_fraction": 0.0421,
            "epoch": 4.0, "train/lr": 0.0, "val/top1": 0.7531, "val/top5": 0.9642, "val/loss": 0.9137,
            "val/ema/top1": 0.7488, "val/samples": 360}


def _eval_result(step: int, acc1: float) -> dict:
    return {"dataset": "wds_digits", "model": "resnet18", "pretrained": "runs/fake/checkpoints",
            "task": "classification", "language": "en", "checkpoint_step": step, "checkpoint_sha256": "ab" * 32,
            "metrics": {"acc1": acc1, "acc5": 0.99, "num_samples": 360, "num_skipped": {}}}


def make_run_dir(root: Path, write_row=lambda row: row, name: str = "fake_resnet") -> Path:
    """A run dir of a classifier run; write_row(row) is what each metrics row is written as."""
    run_dir = root / name
    (run_dir / "eval").mkdir(parents=True)
    rows = [_row(step) for step in range(10, 120, 10)]
    # A resume from the step-80 checkpoint re-logs steps 90-110 (the later rows win), and a run killed
    # mid-write leaves a truncated line: both happen to real run dirs.
    resumed = [{**_row(step), "train/loss": _row(step)["train/loss"] * 0.9} for step in (90, 100, 110)]
    lines = [json.dumps(write_row(r)) for r in rows] + ['{"step": 115, "loss": 0.1']
    lines += [json.dumps(write_row(r)) for r in resumed + [_final_row()]]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "config.yaml").write_text(CONFIG_YAML)
    (run_dir / "versions.json").write_text(json.dumps({"python": "3.11.7", "torch": "2.14.1", "deepspeed": "0.19.8",
                                                       "git": {"revision": REVISION, "dirty": True}}))
    (run_dir / "final_metrics.json").write_text(json.dumps(
        {k: v for k, v in write_row(_final_row()).items() if k != "time_utc"} | {"checkpoint": "ckpt/step_00000120"}))
    (run_dir / "eval" / "digits_step80.json").write_text(json.dumps(_eval_result(80, 0.7012)))
    (run_dir / "eval" / "digits_step120.json").write_text(json.dumps(_eval_result(120, 0.7544)))
    (run_dir / "eval" / "summary.json").write_text(json.dumps({"not": "a result"}))
    return run_dir


def test_report_writes_plots_and_summary(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / "report"
    assert str(out / "report.html") in capsys.readouterr().out

    expected = {"loss.png", "lr.png", "samples_per_second.png", "data_wait_fraction.png", "val_accuracy.png",
                "eval_classification_wds_digits.png"}
    pngs = {p.name for p in out.glob("*.png")}
    assert expected <= pngs, pngs
    for name in pngs:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
            img.verify()

    md = (out / "report.md").read_text()
    # Final numbers (final_metrics.json), formatted at 4 significant digits.
    for text in ("| train/loss | 0.1149 |", "| val/top1 | 0.7531 |", "| val/top5 | 0.9642 |",
                 "| val/ema/top1 | 0.7488 |", "| train/samples_per_second | 371.2 |",
                 "| train/data_wait_fraction | 0.0421 |", "| step | 120 |"):
        assert text in md, text
    # Config highlights: 2 ranks x 32 per rank x 2 accumulation steps.
    for text in ("| model | resnet18 (classifier) |", "| ZeRO stage | 2 |", "| ranks (Ray workers) | 2 |",
                 "| global batch | 128 |", "| batch per rank | 32 |", "| train data | /data/digits/train |"):
        assert text in md, text
    # Skipped samples summed over the log rows, by reason (the resumed rows replace the first ones).
    assert "| undecodable jpg | 10 |" in md and "| no cls | 2 |" in md
    # Eval results: both checkpoints in one table; the JSON that is not a result is counted, not fatal.
    assert "## Eval: classification" in md
    assert "| wds_digits | resnet18 | 80 | 0.7012 |" in md and "| wds_digits | resnet18 | 120 | 0.7544 |" in md
    assert "JSON without dataset/model/task/metrics | 1 |" in md
    assert "not JSON (truncated line?) | 1 |" in md and "resumed 1 time(s)" in md
    assert f"| git revision | {REVISION} (uncommitted changes) |" in md and "| deepspeed | 0.19.8 |" in md
    for name in expected:
        assert f"]({name})" in md

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "<td>val/top1</td><td>0.7531</td>" in page and "<td>ZeRO stage</td><td>2</td>" in page
    # The eval results' curves name where each number comes from: eval/<dataset>/<metric>.
    assert "eval/wds_digits/acc1" in page


def test_report_output_dir_and_clip_metrics(tmp_path):
    run_dir = tmp_path / "clip_run"
    run_dir.mkdir()
    rows = [{"step": s, "train/loss": 3.0 - s / 100, "train/lr": 1e-3, "train/samples_per_second": 100.0,
             "train/data_wait_fraction": 0.1, "val/zeroshot/digits/acc1": 0.5 + s / 1000,
             "val/zeroshot/digits/acc5": 0.9, "val/zeroshot/digits/samples": 360,
             "val/image_retrieval_recall@1": 0.1}
            for s in (50, 100, 150)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "elsewhere"
    assert main(["report", str(run_dir), "--output", str(out)]) == 0
    assert not (run_dir / "report").exists()
    names = {p.name for p in out.glob("*.png")}
    assert {"val_zeroshot_digits.png", "val_retrieval.png", "loss.png"} <= names
    md = (out / "report.md").read_text()
    # No final_metrics.json / config / versions: the last row stands in and the gaps are said.
    assert "Final metrics (last metrics row)" in md and "| val/zeroshot/digits/acc1 | 0.65 |" in md
    assert "No config.yaml" in md and "No versions.json" in md


def test_report_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    assert main(["report", str(tmp_path / "not_a_run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "metrics.jsonl" in err and "\n" not in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


# -- run dirs of earlier versions: flat keys, classifier top-k in percent ---------------------------

# What each key was called before keys had prefixes, written out by hand (not by pipeline.metrics).
LEGACY_NAMES = {"train/loss": "loss", "train/lr": "lr", "train/samples_per_second": "samples_per_second",
                "train/data_wait_seconds": "data_wait_seconds", "train/data_wait_fraction": "data_wait_fraction",
                "train/skipped_samples": "skipped_samples", "val/top1": "val_top1", "val/top5": "val_top5",
                "val/loss": "val_loss", "val/ema/top1": "val_ema_top1", "val/samples": "val_samples",
                "val/zeroshot/digits/acc1": "val_zeroshot_digits_acc1",
                "val/zeroshot/digits/samples": "val_zeroshot_digits_samples"}
LEGACY_PERCENT = {"val/top1", "val/top5", "val/ema/top1"}  # classify wrote these in percent


def as_legacy(row: dict) -> dict:
    return {LEGACY_NAMES.get(key, key): 100 * value if key in LEGACY_PERCENT else value
            for key, value in row.items()}


def _report_text(path: Path, run_dir: Path) -> str:
    return "\n".join(line for line in path.read_text().replace(str(run_dir), "RUN").splitlines()
                     if not line.startswith(("Generated", "<p>Generated")))


def test_report_reads_a_legacy_run_dir_as_fractions_under_todays_keys(tmp_path, capsys):
    current = make_run_dir(tmp_path / "a", name="run")
    legacy = make_run_dir(tmp_path / "b", write_row=as_legacy, name="run")
    assert '"val_top1": 75.31' in (legacy / "final_metrics.json").read_text()  # the old file, as written
    assert main(["report", str(current)]) == 0 and main(["report", str(legacy)]) == 0
    md = (legacy / "report" / "report.md").read_text()
    for text in ("| val/top1 | 0.7531 |", "| val/top5 | 0.9642 |", "| val/ema/top1 | 0.7488 |",
                 "| train/loss | 0.1149 |", "| undecodable jpg | 10 |"):
        assert text in md, text
    assert "val_top1" not in md and "75.31" not in md
    # The same report, page for page, as the run dir written with today's keys.
    for name in ("report.md", "report.html"):
        assert _report_text(legacy / "report" / name, legacy) == _report_text(current / "report" / name, current)
    assert {p.name for p in (legacy / "report").glob("*.png")} == {p.name for p in (current / "report").glob("*.png")}


def test_legacy_clip_rows_read_under_todays_keys(tmp_path):
    from pipeline.reporting.run_record import load_run

    run_dir = tmp_path / "clip_run"
    run_dir.mkdir()
    row = {"step": 50, "loss": 2.5, "val_zeroshot_my_digits_acc1": 0.61, "val_zeroshot_my_digits_samples": 360,
           "val_zeroshot_my_digits_skipped_samples": {"no cls": 1}, "val_image_retrieval_recall@5": 0.4,
           "val_ema_zeroshot_my_digits_acc1": 0.6, "val_warnings": ["w"]}
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (read,) = load_run(run_dir).rows
    assert read == {"step": 50, "train/loss": 2.5, "val/zeroshot/my_digits/acc1": 0.61,
                    "val/zeroshot/my_digits/samples": 360, "val/zeroshot/my_digits/skipped_samples": {"no cls": 1},
                    "val/image_retrieval_recall@5": 0.4, "val/ema/zeroshot/my_digits/acc1": 0.6,
                    "val/warnings": ["w"]}
