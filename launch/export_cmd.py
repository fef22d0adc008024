"""`launch export --checkpoint REF --format open_clip|timm|open_clip-dir|timm-dir|safetensors --output PATH`.

    launch export --checkpoint runs/smoke_clip --format open_clip --output out/smoke.safetensors
        -> open_clip.add_model_config("out/NAME.json") (tiny architectures only), then
           open_clip.create_model_and_transforms(NAME, pretrained="out/smoke.safetensors")
    launch export --checkpoint runs/rn50 --format timm --output out/rn50.pth
        -> timm.create_model("resnet50", checkpoint_path="out/rn50.pth", num_classes=N)
           (our resnet_tiny / resnet_nano: `import pipeline.models` first, which registers them with timm)
    launch export --checkpoint runs/smoke_resnet --format safetensors --output out/nano.safetensors
        -> weights + architecture metadata
    launch export --checkpoint runs/smoke_clip --format open_clip-dir --output out/smoke_clip
        -> open_clip.create_model_and_transforms("local-dir:out/smoke_clip") (tiny architectures too)
    launch export --checkpoint runs/smoke_resnet --format timm-dir --output out/smoke_resnet
        -> timm.create_model("local-dir:out/smoke_resnet", pretrained=True) (resnet_tiny too, without
           `import pipeline.models`), timm.data.resolve_data_config on it = our eval transform

Every export records its architecture, run config and step, so `launch eval ... --checkpoint FILE` reads
it back (no --model needed) and scores it exactly as the source checkpoint.
"""
from __future__ import annotations

import argparse
import json
import posixpath
import tempfile
from pathlib import Path

from pipeline import storage
from pipeline.evaluation.export import export, export_formats


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export` on the launcher's subparsers."""
    parser = subparsers.add_parser("export", help="write a checkpoint as open_clip / timm / safetensors weights",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="REF",
                        help="run dir, checkpoint dir, exported .safetensors, or open_clip/timm weights file")
    parser.add_argument("--format", required=True, choices=export_formats(), dest="export_format")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help=".safetensors, .bin, .pt or .pth file; a folder for the *-dir formats")
    parser.add_argument("--model", metavar="NAME", help="architecture of a weights file (as in `launch eval`)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluation.resolver import resolve

    resolved = resolve(args.checkpoint, args.model)
    if storage.is_remote(args.output):  # written here, then each file uploaded to the same place under the URL
        with tempfile.TemporaryDirectory(prefix="export_") as folder:
            written = export(resolved, args.export_format, Path(folder) / posixpath.basename(args.output))
            files = storage.upload_written(written, folder, posixpath.dirname(args.output.rstrip("/")))
    else:
        files = [str(p) for p in export(resolved, args.export_format, Path(args.output))]
    print(json.dumps({"model": resolved.model_name, "library": resolved.library, "step": resolved.step,
                      "content_sha256": resolved.content_sha256, "files": files}, indent=2))
    return 0
