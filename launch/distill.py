"""`launch distill --config FILE`: the pretrain path with a frozen teacher (config section `distill`)."""
from __future__ import annotations

import argparse

from launch import pretrain
from pipeline.config import ConfigError, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("distill", help="distil a teacher checkpoint into a student (function matching)")
    parser.add_argument("--config", required=True, help="YAML config with a distill section (configs/*distill*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: embedded local cluster)")
    parser.add_argument("--no-ray", action="store_true", help="run the worker loop in this process")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not load_config(args.config, args.set).distill.teacher:
        raise ConfigError("distill.teacher", "is required for launch distill", args.config)
    return pretrain.run(args)
