"""`launch soup --checkpoints REF [REF ...] --method uniform|greedy --data HELD_OUT [--output DIR]`.

    launch soup --checkpoints runs/ft_a runs/ft_b runs/ft_c --method greedy \
        --data data/samples/digits/labelled/val --output soups/digits
        -> soups/digits/model.safetensors + config.json (a timm-dir export) + soup.json

Averages the weights of fine-tunes of one pretrained model (pipeline.evaluation.soup: BatchNorm statistics
averaged, why there). greedy adds ingredients best first and keeps each only if held-out top-1 does not drop;
uniform averages them all. The soup is a checkpoint like any other: `launch eval classify --checkpoint DIR`,
`launch export --checkpoint DIR`, distill.teacher: DIR, model.pretrained_path: DIR/model.safetensors.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pipeline import storage

DEFAULT_OUTPUT = "soups/{method}"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `soup` on the launcher's subparsers."""
    parser = subparsers.add_parser("soup", help="average fine-tuned checkpoints' weights (uniform or greedy soup)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", required=True, nargs="+", metavar="REF",
                        help="run dirs, checkpoint dirs or exports of one architecture and class list")
    parser.add_argument("--method", required=True, choices=("uniform", "greedy"))
    parser.add_argument("--data", required=True, metavar="HELD_OUT",
                        help="held-out labelled set (DIR/<split>/*.tar or DIR/*.tar; a bucket URL too), as "
                             "`launch eval --data`")
    parser.add_argument("--output", metavar="DIR", help=f"empty or new folder, local or a bucket URL "
                                                         f"(default: {DEFAULT_OUTPUT})")
    parser.add_argument("--split", default="test", help="split folder of --data to score (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes (default: 2)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the GPU when there is one)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from pipeline.data.local_copy import readable_folder
    from pipeline.evaluation.soup import check_output, make_soup, write_soup
    from pipeline.evaluation.tasks import EvalOptions

    options = EvalOptions(split=args.split, batch_size=args.batch_size, num_workers=args.workers,
                          device=args.device)
    output = args.output or DEFAULT_OUTPUT.format(method=args.method)
    if storage.is_remote(output):
        storage.check_reachable(output, "--output", writable=True)
    check_output(output)
    soup, record = make_soup(list(args.checkpoints), args.method, readable_folder(args.data, "--data"), options)
    if storage.is_remote(output):  # written here, then uploaded to the same names under the URL (as export)
        check_output(output)
        with tempfile.TemporaryDirectory(prefix="soup_") as folder:
            local = Path(folder) / "soup"
            files = storage.upload_written(write_soup(soup, record, local), local, output)
    else:
        files = [str(path) for path in write_soup(soup, record, Path(output))]
    print(json.dumps({**record, "files": files}, indent=2))
    return 0
