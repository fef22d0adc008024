"""The `launch` console script: pretrain, distill, eval, export, submit (status, logs, stop), benchmark-data,
report, soup.

Dispatch (as in data_prep/cli.py): each subcommand's parser sets `func`, the function that runs it; main() calls
args.func(args). User mistakes (ConfigError / ValueError) print one line and exit 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Single-machine Ray stays on 127.0.0.1 unless the user says otherwise.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Subcommand modules, each with add_parser(subparsers), in the order --help lists them.
COMMANDS = ("launch.pretrain", "launch.distill", "launch.eval_cmd", "launch.export_cmd", "launch.submit",
            "launch.benchmark_data", "launch.report", "launch.soup")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description="Pretraining pipeline: Ray + DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # ConfigError is a ValueError: the key and the file are in the message
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
