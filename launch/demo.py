"""`make demo`: the main job on the embedded default (a local Ray cluster, the CPU, the digits corpus).

Trains the smoke ResNet with 2 Ray workers under DeepSpeed ZeRO-2, then prints the held-out
validation top-1 and the run directory. A fresh run each time (the demo's run dir is replaced).
"""
from __future__ import annotations

import os
import shutil
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from launch.pretrain import prepared_config, run_on_ray  # noqa: E402
from launch.prepare import write_run_record  # noqa: E402

CONFIG = "configs/smoke_resnet.yaml"


def main() -> int:
    started = time.time()
    cfg = prepared_config(CONFIG, ["run.name=demo"])
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    run_dir = write_run_record(cfg, CONFIG)
    final = run_on_ray(cfg, address=None)
    if not final:
        print("demo: training failed", file=sys.stderr)
        return 1
    minutes = (time.time() - started) / 60
    print("\n" + "=" * 72)
    print(f"demo: validation top-1 on {final.get('val_samples')} held-out digits: {final['val_top1']:.2f}%"
          f" (top-5 {final['val_top5']:.2f}%) after {final['step']} steps, {minutes:.1f} min")
    print(f"demo: run dir {run_dir}: config.yaml, versions.json, metrics.jsonl, tensorboard/, checkpoints/")
    print("=" * 72)
    return 0 if final["val_top1"] >= 90 else 1


if __name__ == "__main__":
    sys.exit(main())
