"""`make demo`: the main jobs on the embedded default (a local Ray cluster, the CPU, the digits corpus).

1. The smoke ResNet: 2 Ray workers under DeepSpeed ZeRO-2, held-out validation top-1.
2. The smoke CLIP: the same launcher and trainer, contrastive, zero-shot accuracy on held-out digits.
3. Distillation: the ResNet of step 1 teaches a smaller ResNet (function matching), beside the same
   student trained on the labels with the same budget.
Fresh runs each time (the demo's run dirs are replaced).
"""
from __future__ import annotations

import os
import shutil
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from launch.console import RUN_LOG, run_output  # noqa: E402
from launch.prepare import write_run_record  # noqa: E402
from launch.pretrain import prepared_config, run_on_ray  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.metrics import percent  # noqa: E402


def train(config: str, name: str, *overrides: str) -> tuple[dict, str]:
    overrides = (f"run.name={name}", *overrides)
    fresh = load_config(config, list(overrides)).run_dir
    shutil.rmtree(fresh, ignore_errors=True)
    # From the preflight on (which consolidates a distillation teacher through DeepSpeed), what the libraries
    # print goes to the run's log.
    with run_output(fresh / RUN_LOG):
        cfg = prepared_config(config, list(overrides))
        run_dir = write_run_record(cfg, config)
        return run_on_ray(cfg, address=None) or {}, str(run_dir)


def main() -> int:
    started = time.time()
    try:
        resnet, resnet_dir = train("configs/smoke_resnet.yaml", "demo_resnet")
        clip, clip_dir = train("configs/smoke_clip.yaml", "demo_clip")
        # Function matching: the ResNet above teaches resnet_nano; the same student with the same
        # budget learns from the labels alone for comparison.
        distilled, distill_dir = train("configs/smoke_distill.yaml", "demo_distill",
                                       f"distill.teacher={resnet_dir}")
        from_labels, _ = train("configs/smoke_distill.yaml", "demo_student_labels", "distill.teacher=")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    minutes = (time.time() - started) / 60
    zero_shot = next((v for k, v in clip.items() if k.startswith("val/zeroshot/") and k.endswith("/acc1")), None)
    print("\n" + "=" * 76)
    if resnet:
        print(f"demo: ResNet validation top-1 on {resnet.get('val/samples')} held-out digits: "
              f"{percent(resnet['val/top1'])} (top-5 {percent(resnet['val/top5'])}) after {resnet['step']} steps")
        print(f"      run dir {resnet_dir}")
    if zero_shot is not None:
        print(f"demo: CLIP zero-shot accuracy on the held-out digits: {percent(zero_shot)} "
              f"after {clip['step']} steps (chance 10%)")
        print(f"      run dir {clip_dir}")
    if distilled and from_labels:
        print(f"demo: distillation into resnet_nano (0.3M params), held-out top-1: teacher "
              f"{percent(resnet.get('val/top1', 0))} | student distilled {percent(distilled['val/top1'])} | "
              f"same student from labels {percent(from_labels['val/top1'])}")
        print(f"      run dir {distill_dir}")
    print(f"demo: {minutes:.1f} min in all; each run dir holds config.yaml, versions.json, metrics.jsonl, "
          "tensorboard/, checkpoints/")
    print("=" * 76)
    ok = resnet.get("val/top1", 0) >= 0.9 and (zero_shot or 0) >= 0.8 and distilled.get("val/top1", 0) >= 0.85
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
