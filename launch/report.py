"""`launch report RUN_DIR [--output DIR]`: plots and a one-page summary of a run.

    launch report runs/smoke_clip                  # -> runs/smoke_clip/report/report.html, report.md, *.png
    launch report runs/smoke_resnet --output /tmp/smoke_resnet_report
    launch report s3://bucket/runs/smoke_clip      # -> s3://bucket/runs/smoke_clip/report/ (or --output)

Reads RUN_DIR/metrics.jsonl, config.yaml, versions.json, final_metrics.json and the eval result JSONs
under RUN_DIR/eval/ (e.g. `launch eval zeroshot ... --output RUN_DIR/eval/cifar10.json`). Writes PNG plots
(loss, lr, samples/s, data-wait fraction, every eval metric over steps) and report.md / report.html.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("report", help="plots and a one-page summary of a run dir",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run dir of `launch pretrain` / `launch distill`")
    parser.add_argument("--output", metavar="DIR", help="where the report goes (default: RUN_DIR/report/)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # matplotlib loads when a report is made, not when `launch` builds its parser.
    from pipeline import storage
    from pipeline.reporting import write_report

    run_dir, output = args.run_dir, args.output
    if storage.is_remote(run_dir):  # a run in a bucket: its record (no checkpoints) copied here first
        from pipeline.remote_refs import localize_run_record

        local = localize_run_record(run_dir)
        output = output or storage.join(run_dir, "report")
        run_dir = str(local)
    if output and storage.is_remote(output):  # written here, then uploaded
        import tempfile

        with tempfile.TemporaryDirectory(prefix="report_") as folder:
            report = write_report(Path(run_dir), Path(folder))
            storage.upload(folder, output)
        print(f"[report] {len(report.plots)} plots, {storage.join(output, report.markdown.name)}, "
              f"{storage.join(output, report.html.name)}")
        return 0
    report = write_report(Path(run_dir), Path(output) if output else None)
    print(f"[report] {len(report.plots)} plots, {report.markdown}, {report.html}")
    return 0
