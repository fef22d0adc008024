"""The `launch` console script: pretrain, distill, eval, export, submit (status, logs, stop), benchmark-data,
report, soup.

Dispatch (as in data_prep/cli.py): each subcommand's parser sets `func`, the function that runs it; main() calls
args.func(args). User mistakes (ConfigError / ValueError) print one line and exit 2, without a traceback.
A command whose parser sets `exit_without_teardown` (eval: ~0.8 s of torch and open_clip teardown) ends
its command-line process without the interpreter's teardown (pipeline.process_exit).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline.process_exit import exit_without_teardown

# Single-machine Ray stays on 127.0.0.1 unless the user says otherwise.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Subcommand -> the module whose add_parser(subparsers) registers it, in the order --help lists them.
COMMANDS = {"pretrain": "launch.pretrain", "distill": "launch.distill", "eval": "launch.eval_cmd",
            "export": "launch.export_cmd", "submit": "launch.submit", "status": "launch.submit",
            "logs": "launch.submit", "stop": "launch.submit", "benchmark-data": "launch.benchmark_data",
            "report": "launch.report", "soup": "launch.soup"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The launcher's parser. Given the command line, only its command's module is imported: the modules
    import what their commands need (export's imports torch, open_clip and timm, ~6 CPU s), which
    `launch status` or `launch eval` should not pay for another command's sake. --help and unknown
    commands get every command."""
    parser = argparse.ArgumentParser(prog="launch", description="Pretraining pipeline: Ray + DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    command = next((arg for arg in (argv or []) if not arg.startswith("-")), None)
    modules = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    code = _run(args)
    if from_command_line and getattr(args, "exit_without_teardown", False):
        exit_without_teardown(code)  # the command's parser opted in: its work is on disk when it returns
    return code


def _run(args: argparse.Namespace) -> int:
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
