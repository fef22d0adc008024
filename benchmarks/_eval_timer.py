"""Runs one zero-shot evaluation in this process and times the evaluation itself (text classifier +
image pass, data loader start included), leaving out interpreter start and imports.

    python benchmarks/_eval_timer.py ours            -- launch eval zeroshot ARGS...    (project venv)
    python benchmarks/_eval_timer.py clip_benchmark  CONFIG.json -- clip_benchmark eval ARGS...  (reference venv)

Both sides are timed around the same span: CLIP_benchmark's `zeroshot_classification.evaluate` and our
`pipeline.evaluation.zero_shot.evaluate_zero_shot`. CONFIG.json is the open_clip model config that
CLIP_benchmark's process registers before it loads the model (ours reads it from --model). The last
stdout line is JSON: {"eval_seconds", "metrics"}.
"""
from __future__ import annotations

import atexit
import json
import sys
import time


def _timed(module, name: str, box: dict):
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        box["eval_seconds"] = time.perf_counter() - start
        box["metrics"] = result
        return result

    setattr(module, name, wrapper)


def run_ours(argv: list[str]) -> dict:
    from launch.cli import build_parser
    from launch.eval_cmd import import_evaluation

    # Imported here before the command runs, by the command's own import step (the same probes answered).
    import_evaluation(build_parser(argv).parse_args(argv))
    from pipeline.evaluation import tasks

    box: dict = {}
    _timed(tasks, "evaluate_zero_shot", box)  # tasks.run_zeroshot calls it through the tasks module
    from launch.cli import main

    # As `launch` runs it: main() reads sys.argv and, from the command line, ends the process once the
    # result is written (pipeline.process_exit), so the timing line is printed by an exit handler.
    atexit.register(_print_line, box)
    sys.argv = ["launch", *argv]
    rc = main()
    if rc != 0:
        raise SystemExit(rc)
    return box


def run_clip_benchmark(config_path: str, argv: list[str]) -> dict:
    import open_clip
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    open_clip.add_model_config(config_path)
    box: dict = {}
    _timed(zeroshot_classification, "evaluate", box)
    sys.argv = ["clip_benchmark", *argv]
    cli.main()
    return box


def _print_line(box: dict) -> None:
    if "metrics" not in box:  # the command failed before its evaluation ended: its exit code says so
        return
    metrics = {k: float(v) for k, v in box["metrics"].items() if isinstance(v, (int, float)) and v is not None}
    print(json.dumps({"eval_seconds": box["eval_seconds"], "metrics": metrics}), flush=True)


def main() -> None:
    side, rest = sys.argv[1], sys.argv[2:]
    split = rest.index("--")
    if side == "ours":
        run_ours(rest[split + 1:])  # its exit handler prints the line
    else:
        _print_line(run_clip_benchmark(rest[0], rest[split + 1:]))


if __name__ == "__main__":
    main()
