"""Round trips a user tries first (issue 12): every `launch export` format read back by `launch eval` in a
fresh interpreter gives the source checkpoint's numbers; plain timm loads our tiny architectures after
`import pipeline.models`; `launch report` plots metrics and tables counts; a truncated eval shard and
open_clip's factory chatter stay off the console.

The models are tiny: resnet_nano trained here for two epochs on the digits corpus (so a changed eval
transform would show in its accuracy) and a randomly initialised clip-tiny-rn, written in our checkpoint
layout without Ray or DeepSpeed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.cli import main as launch_main
from pipeline.config import Config
from pipeline.evaluation.export import export_formats
from test_evaluation_helpers import write_our_checkpoint

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    """`launch ARGS` in a fresh interpreter: it knows only what the command itself imports and registers."""
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def _digits_config(digits_root: Path, kind: str, name: str) -> dict:
    return Config.from_dict({
        "data": {"train": f"{digits_root}/labelled/train", "val": f"{digits_root}/labelled/val",
                 "num_classes": 10, "image_size_px": 32, "val_crop_pct": 1.0,
                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "model": {"kind": kind, "name": name},
    }).to_dict()


def _train_nano(raw: dict, digits_root: Path) -> dict[str, torch.Tensor]:
    from pipeline.data.eval_batches import labelled_batches
    from pipeline.data.labelled import eval_transform
    from pipeline.evaluation import datasets
    from pipeline import families

    cfg = Config.from_dict(raw)
    torch.manual_seed(0)
    model = families.get(cfg.model.kind).build(cfg, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    shards = datasets.split_shards(digits_root / "labelled", "train")
    for _ in range(2):
        for item in labelled_batches(shards, eval_transform(cfg.data), 64, 0):
            loss = torch.nn.functional.cross_entropy(model(item.batch.images), item.batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def runs(digits_root, tmp_path_factory):
    """{'classifier': run dir, 'clip': run dir} in our checkpoint layout."""
    from pipeline.models.clip import build_clip

    root = tmp_path_factory.mktemp("round_trips")
    classifier = _digits_config(digits_root, "classifier", "resnet_nano")
    write_our_checkpoint(root / "nano", 120, _train_nano(classifier, digits_root), classifier)
    clip = _digits_config(digits_root, "clip", "clip-tiny-rn")
    cfg = Config.from_dict(clip)
    torch.manual_seed(1)
    write_our_checkpoint(root / "clip", 30, build_clip(cfg.model, cfg.contrastive).state_dict(), clip)
    return {"classifier": root / "nano", "clip": root / "clip"}


# (task, --data below the digits root, --split) per model kind
EVAL_SETS = {"classifier": ("classify", "labelled", "val"), "clip": ("zeroshot", "zeroshot", "test")}


def launch_eval(kind: str, checkpoint: Path, digits_root: Path, model: str | None) -> dict:
    task, data, split = EVAL_SETS[kind]
    argv = ["eval", task, "--checkpoint", str(checkpoint), "--data", str(digits_root / data), "--split", split,
            "--workers", "0", "--device", "cpu", *(["--model", model] if model else [])]
    done = cli(*argv)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "initialized randomly" not in done.stderr, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def source_results(runs, digits_root):
    """kind -> `launch eval` of the run dir itself, evaluated on first use."""
    cache: dict[str, dict] = {}

    def result(kind: str) -> dict:
        if kind not in cache:
            cache[kind] = launch_eval(kind, runs[kind], digits_root, None)
        return cache[kind]
    return result


# (model kind, --format, output file name, --model given to `launch eval`)
ROUND_TRIPS = [
    ("classifier", "timm", "nano.pth", "resnet_nano"),  # the case, verbatim
    ("classifier", "timm", "nano.pth", "timm:resnet_nano"),
    ("classifier", "timm", "nano.pth", None),
    ("classifier", "timm", "nano.safetensors", "resnet_nano"),
    ("classifier", "safetensors", "nano.safetensors", None),
    ("clip", "open_clip", "open_clip_model.bin", "clip-tiny-rn"),
    ("clip", "open_clip", "open_clip_model.safetensors", None),
    ("clip", "safetensors", "clip.safetensors", None),
    ("classifier", "timm-dir", "nano_dir", None),  # a folder: `launch eval --checkpoint DIR`
    ("clip", "open_clip-dir", "clip_dir", None),
]


def test_round_trips_cover_every_export_format():
    assert {fmt for _, fmt, _, _ in ROUND_TRIPS} == set(export_formats())


@pytest.mark.parametrize("kind, fmt, filename, model", ROUND_TRIPS,
                         ids=[f"{f}-{n}-{m}" for _, f, n, m in ROUND_TRIPS])
def test_export_reads_back_in_launch_eval_with_the_source_numbers(runs, source_results, digits_root, tmp_path,
                                                                  kind, fmt, filename, model):
    output = tmp_path / filename
    assert launch_main(["export", "--checkpoint", str(runs[kind]), "--format", fmt, "--output", str(output)]) == 0
    result = launch_eval(kind, output, digits_root, model)
    source = source_results(kind)
    assert result["checkpoint_sha256"] == source["checkpoint_sha256"]
    for key in ("acc1", "acc5", "mean_per_class_recall", "num_samples"):
        assert result["metrics"][key] == source["metrics"][key], key
    if kind == "classifier":
        assert source["metrics"]["acc1"] > 0.5  # trained: a different eval transform would change it


def test_plain_timm_loads_the_timm_export_after_import_pipeline_models(runs, tmp_path):
    """What the README tells a timm user: `import pipeline.models` registers resnet_tiny / resnet_nano."""
    output = tmp_path / "nano.pth"
    assert launch_main(["export", "--checkpoint", str(runs["classifier"]), "--format", "timm",
                        "--output", str(output)]) == 0
    script = ("import sys, timm, torch, pipeline.models\n"
              "model = timm.create_model('resnet_nano', checkpoint_path=sys.argv[1], num_classes=10).eval()\n"
              "print(model(torch.zeros(1, 3, 32, 32)).shape[-1])\n")
    done = subprocess.run([sys.executable, "-c", script, str(output)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "10", done.stderr


def test_our_architecture_names_resolve_in_a_fresh_interpreter():
    script = ("from pipeline.evaluation.resolver import library_for\n"
              "print([library_for(n) for n in ('resnet_tiny', 'timm:resnet_nano', 'clip-tiny-rn', "
              "'open_clip:clip-tiny-vit')])\n"
              "for bad in ('timm:resnet_nope', 'open_clip:resnet_tiny'):\n"
              "    try:\n"
              "        library_for(bad)\n"
              "    except ValueError as err:\n"
              "        print(err)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str([("timm", "resnet_tiny"), ("timm", "resnet_nano"), ("open_clip", "clip-tiny-rn"),
                            ("open_clip", "clip-tiny-vit")])
    assert lines[1:] == ["--model timm:resnet_nope: timm has no architecture 'resnet_nope' (e.g. timm:resnet50)",
                         "--model open_clip:resnet_tiny: open_clip has no architecture 'resnet_tiny' "
                         "(e.g. open_clip:ViT-B-32)"]


def test_open_clip_export_does_not_claim_random_weights(runs, tmp_path):
    done = cli("export", "--checkpoint", str(runs["clip"]), "--format", "open_clip",
               "--output", str(tmp_path / "open_clip_model.bin"))
    assert done.returncode == 0, done.stderr
    assert "initialized randomly" not in done.stdout + done.stderr
    assert "No pretrained weights" not in done.stdout + done.stderr
    assert json.loads(done.stdout)["files"][0].endswith("open_clip_model.bin")


# -- one-line errors: eval data ---------------------------------------------------------------------


def _broken_copy(digits_root: Path, folder: Path, how: str) -> Path:
    """The labelled val split with its first shard cut in the middle of a member, or replaced by junk."""
    shards = sorted((digits_root / "labelled" / "val").glob("*.tar"))
    (folder / "val").mkdir(parents=True)
    for shard in shards:
        (folder / "val" / shard.name).write_bytes(shard.read_bytes())
    bad = folder / "val" / shards[0].name
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100] if how == "truncated" else b"not a tar file\n" * 100)
    return bad


@pytest.mark.parametrize("how, workers", [("truncated", "2"), ("truncated", "0"), ("junk", "1")])
def test_broken_eval_shard_is_one_line_naming_the_file(runs, digits_root, tmp_path, how, workers):
    bad = _broken_copy(digits_root, tmp_path / "broken", how)
    done = cli("eval", "classify", "--checkpoint", str(runs["classifier"]), "--data", str(tmp_path / "broken"),
               "--split", "val", "--workers", workers, "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0], done.stderr
    assert ("truncated" if how == "truncated" else "not a tar") in errors[0]
    assert done.stdout == ""


# -- launch report: counts in a table, metrics in plots ---------------------------------------------


def _report_run_dir(root: Path) -> Path:
    run_dir = root / "counts_run"
    (run_dir / "eval").mkdir(parents=True)
    rows = []
    for step in range(10, 70, 10):
        row = {"step": step, "train/loss": 2.0 / step, "train/lr": 0.1}
        if step % 20 == 0:
            # At step 60 validation scored 352 of its 360 samples (a shortfall the counts table shows).
            row.update({"val/top1": 0.5 + step / 200, "val/loss": 1.0, "val/samples": 360 if step < 60 else 352,
                        "val/num_classes": 10,
                        "val/zeroshot/digits/acc1": 0.4 + step / 300, "val/zeroshot/digits/samples": 360,
                        "val/zeroshot/digits/num_classes": 10, "val/expected_samples": 360})
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, acc in ((20, 0.61), (60, 0.83)):
        result = {"dataset": "digits", "model": "clip-tiny-rn", "task": "zeroshot_classification",
                  "checkpoint_step": step,
                  "metrics": {"acc1": acc, "acc5": 0.97, "mean_per_class_recall": acc - 0.01, "num_samples": 360,
                              "num_classes": 10, "num_templates": 18, "classnames": "dataset", "num_skipped": {}}}
        (run_dir / "eval" / f"zs_{step}.json").write_text(json.dumps(result))
    return run_dir


COUNTS = {"val/samples", "val/num_classes", "val/zeroshot/digits/samples", "val/zeroshot/digits/num_classes",
          "val/expected_samples", "num_samples", "num_classes", "num_templates"}


def test_report_series_selection_keeps_counts_off_the_plots(tmp_path):
    from pipeline.reporting import plots
    from pipeline.reporting.run_record import load_run

    record = load_run(_report_run_dir(tmp_path))
    plotted = {key for _, keys in plots.eval_metric_groups(record.rows).values() for key in keys}
    assert plotted == {"val/top1", "val/zeroshot/digits/acc1"}
    (metrics,) = plots.eval_result_series(record).values()
    assert set(metrics) == {"eval/digits/acc1", "eval/digits/acc5", "eval/digits/mean_per_class_recall"}
    assert not {f"eval/digits/{key}" for key in COUNTS} & set(metrics) and not COUNTS & plotted


def test_report_tables_the_counts(tmp_path):
    from pipeline.reporting import write_report

    report = write_report(_report_run_dir(tmp_path))
    drawn = {key for plot in report.plots for key in plot.keys}
    assert not (COUNTS | {f"eval/digits/{key}" for key in COUNTS}) & drawn
    markdown = report.markdown.read_text()
    section = markdown.split("## Sample and class counts", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| steps"))
    for key in ("val/samples", "val/num_classes", "val/zeroshot/digits/samples", "val/expected_samples"):
        assert key in header, header
    # Evaluations with the same counts share a row; the shortfall at step 60 gets its own.
    assert "| 20-40 | 360 | 10 | 360 | 10 | 360 |" in section, section
    assert "| 60 | 352 | 10 | 360 | 10 | 360 |" in section, section
    assert "val/num_classes" in report.html.read_text()
    # The eval results' counts stay in their own table (num_templates beside acc1), off the axis.
    assert "num_templates" in markdown.split("## Eval: zeroshot_classification", 1)[1]
