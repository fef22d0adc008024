"""Zero-shot evaluation on the GPU (issue 15, "bf16 on the GPU"): `launch eval zeroshot --amp` beside
CLIP_benchmark's loop, same weights, same shards, same batch and workers, one JSON line per side.
Run by benchmarks/gpu.sh (the GPU machine has no CLIP_benchmark and no package index, so the reference is
CLIP_benchmark's zero-shot loop restated: webdataset `.decode("pil")`, open_clip's preprocess in the loader
workers, the classifier from class names x templates, logits = 100 * normalised features @ classifier).

    python benchmarks/gpu_eval.py --side ours|reference --shards /tmp/gpu_shards --out $OUT/gpu.jsonl
    python benchmarks/gpu_eval.py ... --cpu-smoke      (tiny CLIP, fp32, on the CPU: checks the plumbing)

Weights: open_clip's random init of ViT-B-32 (seed 0; clip-tiny-rn for the smoke), saved once. Classes:
the shards' `cls` labels, named "class 0".."class N-1" (N = --classes), CLIP's 18 CIFAR-10 templates.
Both sides report the seconds of the evaluation itself (classifier + image pass, loader start included) and
the whole process's wall seconds; acc1 must be the same on both (same model, same pixels).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eval_vs_clip_benchmark import TEMPLATES  # CLIP's 18 CIFAR-10 prompts, as CLIP_benchmark ships them
from gpu_cases import write_row

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "pipeline/models/clip_configs/clip-tiny-rn.json"


def prepare(shards: Path, classes: int, cpu_smoke: bool, work: Path) -> tuple[Path, Path, str]:
    """(eval set folder, weights file, --model value): the shards linked into a CLIP_benchmark-layout folder
    with classnames and templates, and random-init weights."""
    import open_clip
    import torch

    data = work / "eval_set"
    (data / "test").mkdir(parents=True, exist_ok=True)
    for tar in sorted(Path(shards).glob("*.tar")):
        link = data / "test" / tar.name
        if not link.exists():
            link.symlink_to(tar.resolve())
    (data / "classnames.txt").write_text("".join(f"class {i}\n" for i in range(classes)))
    (data / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    model = str(SMOKE_CONFIG) if cpu_smoke else "ViT-B-32"
    if cpu_smoke:
        open_clip.add_model_config(SMOKE_CONFIG)
    weights = work / "weights.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(Path(model).stem if cpu_smoke else model).state_dict(), weights)
    return data, weights, model


def reference_eval(data: Path, weights: Path, model: str, batch: int, workers: int, device: str) -> dict:
    """CLIP_benchmark's zero-shot evaluation (clip_benchmark.metrics.zeroshot_classification), restated."""
    import open_clip
    import torch
    import torch.nn.functional as F
    import webdataset as wds

    if model.endswith(".json"):
        open_clip.add_model_config(model)
        model = Path(model).stem
    clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=str(weights), device=device)
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model)
    classnames = (data / "classnames.txt").read_text().split("\n")[:-1]
    templates = (data / "zeroshot_classification_templates.txt").read_text().split("\n")[:-1]
    urls = [str(p) for p in sorted((data / "test").glob("*.tar"))]
    dataset = (wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "cls")
               .map_tuple(preprocess, int).batched(batch))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    started = time.perf_counter()
    with torch.no_grad(), amp:
        weights_per_class = []
        for name in classnames:
            embeddings = clip.encode_text(tokenizer([t.format(c=name) for t in templates]).to(device))
            embedding = F.normalize(embeddings, dim=-1).mean(dim=0)
            weights_per_class.append(embedding / embedding.norm())
        classifier = torch.stack(weights_per_class, dim=1)
        correct = total = 0
        for images, targets in loader:
            features = F.normalize(clip.encode_image(images.to(device)), dim=-1)
            predictions = (100.0 * features @ classifier).argmax(dim=-1).cpu()
            correct += int((predictions == torch.as_tensor(targets)).sum())
            total += len(targets)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"eval_seconds": time.perf_counter() - started, "metrics": {"acc1": correct / total, "num_samples": total}}


def run_side(side: str, data: Path, weights: Path, model: str, batch: int, workers: int, device: str) -> dict:
    """One side in its own process (whole-process wall measured here): its evaluation seconds and metrics."""
    if side == "ours":
        command = [sys.executable, "benchmarks/_eval_timer.py", "ours", "--", "eval", "zeroshot", "--checkpoint",
                   str(weights), "--model", model, "--data", str(data), "--batch-size", str(batch),
                   "--workers", str(workers), "--device", device] + (["--amp"] if device == "cuda" else [])
    else:
        command = [sys.executable, "benchmarks/gpu_eval.py", "--inner-reference", str(data), str(weights), model,
                   "--batch", str(batch), "--workers", str(workers), *(["--cpu-smoke"] if device == "cpu" else [])]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout)[-2000:], "rc": result.returncode}
    row = json.loads(result.stdout.strip().splitlines()[-1])
    num_samples = row["metrics"]["num_samples"]
    return {"wall_seconds": time.perf_counter() - started, "eval_seconds": row["eval_seconds"],
            "images_per_second": num_samples / row["eval_seconds"], "acc1": row["metrics"]["acc1"],
            "num_samples": num_samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=("ours", "reference"))
    parser.add_argument("--shards", help="labelled shards (jpg/png + cls)")
    parser.add_argument("--out", help="JSON lines file the row is appended to")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "gpu_eval"))
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--inner-reference", nargs=3, metavar=("DATA", "WEIGHTS", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    if args.inner_reference:
        data, weights, model = args.inner_reference
        print(json.dumps(reference_eval(Path(data), Path(weights), model, args.batch, args.workers, device)))
        return 0
    if not (args.side and args.shards and args.out):
        parser.error("--side, --shards and --out are required")
    row: dict = {"case": f"eval_zeroshot_{args.side}", "batch": args.batch, "workers": args.workers,
                 "device": device, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        data, weights, model = prepare(Path(args.shards), args.classes, args.cpu_smoke, Path(args.work))
        row.update(run_side(args.side, data, weights, model, args.batch, args.workers, device))
    except Exception as err:  # one failed case must not lose the others' lines
        row["error"] = f"{type(err).__name__}: {err}"
    write_row(args.out, row)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.exit(main())
