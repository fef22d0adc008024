"""`launch eval TASK --checkpoint REF --data DIR`: one evaluation, one JSON result.

    launch eval zeroshot     --checkpoint runs/smoke_clip --data data/wds_cifar10
    launch eval retrieval    --checkpoint ViT-B-32.safetensors --model ViT-B-32 --data data/wds_flickr8k
    launch eval linear-probe --checkpoint runs/smoke_clip --data data/wds_cifar10   (needs train/ and test/;
                             --method clip_benchmark for CLIP_benchmark's AdamW probe)
    launch eval classify     --checkpoint runs/smoke_resnet --data data/digits/val
    launch eval --config eval_plan.yaml    (checkpoints x datasets x tasks; see pipeline.evaluation.plan)
    launch eval --follow runs/smoke_resnet --until-done
                             (each new complete checkpoint of a run, once, on the sets its config names;
                             see pipeline.evaluation.follow)

The result (CLIP_benchmark's keys plus checkpoint step/hash and manifest hash) goes to stdout and,
with --output, to a file. No training math here: pipeline.evaluation does the work.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.import_guard import import_hiding

# pipeline.evaluation pulls in open_clip and scikit-learn: imported when a command runs, not when
# `launch` builds its parser (that kept every `launch` command ~7 s slower to start).

_TASK_HELP = {
    "zeroshot": "zero-shot classification from class names x templates (acc1, acc5, mean per-class recall)",
    "retrieval": "image<->text recall@1/5/10 with several captions per image",
    "linear-probe": "a linear classifier on frozen image features (DIR/train and DIR/test)",
    "classify": "top-1 / top-5 of a classifier on labelled shards",
}


def _add_task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="REF",
                        help="run dir, checkpoint dir, exported .safetensors, or open_clip/timm weights file")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="evaluation set: DIR/<split>/*.tar (CLIP_benchmark wds layout) or DIR/*.tar")
    parser.add_argument("--model", metavar="NAME",
                        help="architecture of a weights file: open_clip or timm name, open_clip:NAME, "
                             "timm:NAME, or an open_clip NAME.json config")
    parser.add_argument("--output", metavar="FILE.json", help="also write the result here")
    parser.add_argument("--split", default="test", help="split folder to score (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes (default: 2)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU when there is one)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="hand the model NCHW batches (default: channels_last memory, as timm's "
                             "--channels-last: faster convolutions; logits within float rounding of NCHW's)")
    parser.add_argument("--strict", action="store_true",
                        help="a scored sample count that differs from the manifest's is an error, not a warning")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` and its task subcommands on the launcher's subparsers."""
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint (zeroshot, retrieval, linear-probe, "
                                                "classify)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML plan: many checkpoints x datasets x tasks, then a summary table")
    parser.add_argument("--follow", metavar="RUN_DIR",
                        help="evaluate each new complete checkpoint of a run (a folder or a bucket URL) once "
                             "(data.val, eval.zeroshot); results in RUN_DIR/eval/ and RUN_DIR/eval_follow.jsonl, "
                             "which a restart resumes from")
    parser.add_argument("--interval-s", type=float, default=60.0,
                        help="with --follow: seconds between looks for new checkpoints (default: 60)")
    parser.add_argument("--until-done", action="store_true",
                        help="with --follow: stop once the run has finished and its checkpoints are evaluated")
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK")
    for name in _TASK_HELP:
        task_parser = tasks.add_parser(name, help=_TASK_HELP[name], description=_TASK_HELP[name])
        _add_task_args(task_parser)
        if name == "linear-probe":
            task_parser.add_argument(
                "--method", metavar="NAME",
                help="logistic_regression: scikit-learn L-BFGS with a C sweep, as the CLIP paper (default); "
                     "clip_benchmark: CLIP_benchmark's torch linear layer, AdamW lr 0.1, 10 epochs of "
                     "--batch-size, weight decay swept on a 20%% validation split, comparable with its tables")
        if name in ("zeroshot", "retrieval"):
            task_parser.add_argument(
                "--embed-dim", type=int, metavar="D",
                help="score the first D dims of each embedding, renormalised (the nested widths of a model "
                     "trained with contrastive.matryoshka_dims); default: the full width")
        task_parser.set_defaults(func=run, eval_task=name)
    # Every result is written (and closed) before run() returns: the process may skip the teardown of torch,
    # open_clip and the model (~0.8 s of an ~8 s zero-shot command, pipeline.process_exit).
    parser.set_defaults(func=run, exit_without_teardown=True)
    return parser


def _options(args: argparse.Namespace):
    from pipeline.evaluation.linear_probe import probe_method
    from pipeline.evaluation.tasks import EvalOptions

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    method = getattr(args, "method", None) or EvalOptions.probe_method
    try:
        probe_method(method)  # an unknown name stops here, listing the valid ones, before any model loads
    except ValueError as err:
        raise ValueError(f"--method: {err}") from None
    return EvalOptions(split=args.split, batch_size=args.batch_size, num_workers=args.workers,
                       device=args.device, amp=args.amp, channels_last=args.channels_last,
                       probe_method=method, strict=args.strict,
                       embed_dim=getattr(args, "embed_dim", None))


def hidden_while_importing(args: argparse.Namespace) -> tuple[str, ...]:
    """What the import-time probes of open_clip, timm and torch are told is not installed
    (pipeline.import_guard): wandb always (timm's probe, ~0.5 s; evaluation never logs to W&B); triton always
    (torch._dynamo's probe, reached through torchvision.ops, ~0.1-0.15 s: only torch.compile uses triton, and
    evaluation compiles nothing; torch keeps the answer for the process); huggingface_hub (~0.26 s: httpx and
    the hub client, probed by both libraries, which remember the answer) unless an `hf-hub:` reference could
    need it: named on the command line, or in a plan or run config read later."""
    refs = (getattr(args, "checkpoint", None) or "", getattr(args, "model", None) or "")
    single_task = getattr(args, "eval_task", None) is not None
    always = ("wandb", "triton")
    return (*always, "huggingface_hub") if single_task and not any("hf-hub" in ref for ref in refs) else always


def import_evaluation(args: argparse.Namespace) -> None:
    """pipeline.evaluation and what it imports (torch, open_clip -> timm), with the probes above answered."""
    # torch first, outside the hiding: its own import asks importlib.util.find_spec about triton, which has
    # no "absent" answer to give for a hidden module (import_hiding would then import everything twice).
    import torch  # noqa: F401

    def importer() -> None:
        import pipeline.evaluation.resolver  # noqa: F401
        import pipeline.evaluation.tasks  # noqa: F401

    import_hiding(hidden_while_importing(args), importer)


def run(args: argparse.Namespace) -> int:
    import_evaluation(args)
    task = getattr(args, "eval_task", None)
    if task is None and getattr(args, "follow", None):
        return _run_follow(args)
    if task is None:
        if not getattr(args, "config", None):
            raise ValueError(f"eval: give a TASK ({', '.join(_TASK_HELP)}) or --config FILE")
        return _run_plan(Path(args.config))
    options = _options(args)
    from pipeline.data.local_copy import readable_folder

    args.data = str(readable_folder(args.data, "--data"))  # sets are read whole: a bucket's is copied once, cached
    if not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: no such folder")
    from pipeline.evaluation.resolver import resolve
    from pipeline.evaluation.tasks import evaluate, write_result

    resolved = resolve(args.checkpoint, args.model)
    result = evaluate(args.eval_task, resolved, Path(args.data), options)
    print_notes(result)
    if args.output:
        write_result(result, args.output)
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


def print_notes(result: dict) -> None:
    """On stderr (stdout is the JSON): a class list mapped by name, and every warning of the result."""
    mapping = result["metrics"].get("label_mapping", "")
    if mapping and not mapping.startswith(("unchecked", "identity")):
        print(f"[eval] {mapping}", file=sys.stderr)
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


def _run_follow(args: argparse.Namespace) -> int:
    from pipeline.evaluation.follow import follow

    if args.interval_s <= 0:
        raise ValueError(f"--interval-s must be > 0, got {args.interval_s}")
    steps = follow(args.follow, args.interval_s, args.until_done)
    print(json.dumps({"run_dir": args.follow, "evaluated_steps": steps}))
    return 0


def _run_plan(path: Path) -> int:
    from pipeline.evaluation.plan import load_plan, run_plan, summary_table
    plan = load_plan(path)
    rows = []
    for row in run_plan(plan):
        rows.append(row)
        print(f"[eval] {row['checkpoint']} {row['dataset']} {row['task']}: "
              f"{row['value'] if row['skipped'] is None else row['skipped']}", file=sys.stderr)
        if row["file"]:
            print_notes(json.loads(Path(row["file"]).read_text()))
    table = summary_table(rows)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    (plan.output_dir / "summary.md").write_text(table + "\n")
    print(table)
    return 0
