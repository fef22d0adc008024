"""`launch report RUN_DIR [--output DIR]`: plots and a one-page summary of a run.

    launch report runs/smoke_clip                  # -> runs/smoke_clip/report/report.html, report.md, *.png
    launch report runs/smoke_resnet --output /tmp/smoke_resnet_report

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
    from pipeline.reporting import write_report

    report = write_report(Path(args.run_dir), Path(args.output) if args.output else None)
    print(f"[report] {len(report.plots)} plots, {report.markdown}, {report.html}")
    return 0
