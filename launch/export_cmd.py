"""`launch export --checkpoint REF --format open_clip|timm|safetensors --output PATH`.

    launch export --checkpoint runs/smoke_clip --format open_clip --output out/smoke.safetensors
        -> open_clip.add_model_config("out/NAME.json") (tiny architectures only), then
           open_clip.create_model_and_transforms(NAME, pretrained="out/smoke.safetensors")
    launch export --checkpoint runs/rn50 --format timm --output out/rn50.pth
        -> timm.create_model("resnet50", checkpoint_path="out/rn50.pth", num_classes=N)
    launch export --checkpoint runs/smoke_resnet --format safetensors --output out/nano.safetensors
        -> weights + architecture metadata; `launch eval ... --checkpoint out/nano.safetensors` needs no --model
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EXPORT_FORMATS = ("open_clip", "safetensors", "timm")  # pipeline.evaluation.export.EXPORTERS, imported lazily


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export` on the launcher's subparsers."""
    parser = subparsers.add_parser("export", help="write a checkpoint as open_clip / timm / safetensors weights",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="REF",
                        help="run dir, checkpoint dir, exported .safetensors, or open_clip/timm weights file")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="export_format")
    parser.add_argument("--output", required=True, metavar="PATH", help=".safetensors, .bin, .pt or .pth file")
    parser.add_argument("--model", metavar="NAME", help="architecture of a weights file (as in `launch eval`)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluation.export import export
    from pipeline.evaluation.resolver import resolve

    resolved = resolve(args.checkpoint, args.model)
    written = export(resolved, args.export_format, Path(args.output))
    print(json.dumps({"model": resolved.model_name, "library": resolved.library, "step": resolved.step,
                      "content_sha256": resolved.content_sha256, "files": [str(p) for p in written]}, indent=2))
    return 0
