"""data-prep goal (issue 3, Performance): `data-prep image-text --url-col` vs img2dataset on the same
640 px JPEG corpus served from a loopback HTTP server, same processes and threads, in one run.

    bash benchmarks/setup_img2dataset.sh            # once: /tmp/bench/img2dataset-venv
    .venv/bin/python benchmarks/data_prep_vs_img2dataset.py [--images 2000] [--processes 2]
        [--threads 16] [--rounds 2]

Corpus: --images photo-like JPEGs (random crops, flips and rescales of scikit-learn's two sample
photos, plus sensor-like noise), longer side 640 px, quality 90 (about 60-120 KB each), made once
under --workdir. A threaded HTTP/1.1 server on 127.0.0.1 serves them from memory (keep-alive allowed;
each client decides whether to reuse connections). The URL table is a parquet file (url, caption).

Both tools: shorter side to --image-size (data-prep `--resize-mode shorter`, img2dataset
`resize_mode=keep_ratio`), JPEG quality 95 (both defaults), webdataset shards of --shard-size
samples, --processes processes x --threads threads (data-prep `--workers P --threads T`, which runs
partitions in a local process pool, or as tasks on an embedded local Ray with `--executor ray`;
img2dataset `processes_count`/`thread_count` with its multiprocessing distributor). data-prep runs as
users run it: progress bar off (as for img2dataset's log), the corpus report on.
samples/s = samples written / wall seconds of the whole command (start-up included). Rounds alternate
(data-prep, img2dataset, data-prep, ...); each tool's figure is its best round. CPU seconds are those of
the command's reaped child processes (the server, in this process, is not counted).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
I2D_VENV = Path(os.environ.get("IMG2DATASET_VENV", "/tmp/bench/img2dataset-venv"))
LONG_SIDE = 640
CORPUS_QUALITY = 90


def build_corpus(folder: Path, num_images: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (longer side 640) from random crops of sklearn's sample photos + noise."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(num_images)]
    if all(p.is_file() for p in paths):
        return paths
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640x427 and 427x640
    rng = np.random.default_rng(seed)
    for i, path in enumerate(paths):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.35, 1.0)), int(h * rng.uniform(0.35, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        aspect = rng.uniform(0.6, 1.6)  # landscape and portrait, 640 on the longer side
        size = (LONG_SIDE, round(LONG_SIDE / aspect)) if aspect >= 1 else (round(LONG_SIDE * aspect), LONG_SIDE)
        pixels = np.asarray(crop.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        pixels += rng.normal(0.0, 4.0, pixels.shape)  # sensor noise: realistic JPEG sizes
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=CORPUS_QUALITY)
    return paths


class Server:
    """Threaded loopback HTTP/1.1 server of the corpus, held in memory."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                server.requests += 1
                body = files.get(self.path.split("?", 1)[0].lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "image/jpeg" if body is not None else "text/plain")
                body = body if body is not None else b"not found"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Backlogged(ThreadingHTTPServer):
            # A class attribute: listen() runs in the constructor. With the default backlog (5), 32
            # clients' connects overflow it and wait out ~1 s SYN retransmits (both tools alike).
            request_queue_size = 256
            daemon_threads = True

        self.httpd = Backlogged(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def write_url_table(path: Path, base: str, names: list[str], num_rows: int) -> None:
    """`num_rows` rows cycling over the corpus (?r=N keeps every URL distinct)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"{base}/{names[i % len(names)]}?r={i}" for i in range(num_rows)]
    captions = [f"a photo, crop number {i} of a sample picture" for i in range(num_rows)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


_TICKS = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process now alive."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS)
    return table


class _TreeCpu:
    """CPU seconds of a process and all its descendants, sampled every 0.1 s from /proc. Ray's
    worker processes are reparented when Ray shuts down, so getrusage(RUSAGE_CHILDREN) misses them;
    this sees every process while it lives (it can miss the last < 0.1 s of a short-lived one)."""

    def __init__(self, root: int) -> None:
        self.root, self.cpu, self._stop = root, {}, threading.Event()
        self._members = {root}
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            table = _process_table()
            changed = True
            while changed:  # descendants: follow parent links until nothing new joins
                changed = False
                for pid, (ppid, _) in table.items():
                    if pid not in self._members and ppid in self._members:
                        self._members.add(pid)
                        changed = True
            for pid in self._members & table.keys():
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), table[pid][1])
            self._stop.wait(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.cpu.values())


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run `cmd`; wall seconds and CPU seconds of its whole process tree (the server, a thread of
    this process, is not counted)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/tmp")
        tree = _TreeCpu(proc.pid)
        returncode = proc.wait()
    wall = time.perf_counter() - start
    polled = tree.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {returncode}); see {log}:\n{log.read_text()[-3000:]}")
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, max(polled, reaped)


def _count_tar_samples(folder: Path) -> tuple[int, tuple[int, int] | None]:
    """Samples (distinct keys with a .jpg) in every tar under `folder`, and one output size."""
    from PIL import Image

    count, size = 0, None
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    count += 1
                    if size is None:
                        size = Image.open(io.BytesIO(tar.extractfile(member).read())).size
    return count, size


def run_data_prep(args: argparse.Namespace, table: Path, out: Path, env: dict[str, str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("data-prep")), "image-text", "--input", str(table),
           "--output", str(out), "--caption-col", "caption", "--url-col", "url",
           "--image-size", str(args.image_size), "--resize-mode", "shorter", "--resample", "area",
           "--shard-size", str(args.shard_size), "--workers", str(args.processes),
           "--threads", str(args.threads), "--timeout", "30", "--retries", "2", "--no-progress",
           "--executor", args.executor]
    if args.data_prep_pythonpath:  # e.g. a folder holding only Pillow-SIMD's PIL package
        env = {**env, "PYTHONPATH": args.data_prep_pythonpath}
    wall, cpu = _timed(cmd, env, out.with_name(out.name + ".log"))
    samples, size = _count_tar_samples(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == samples, (manifest["num_samples"], samples)
    return {"tool": "data-prep", "samples": samples, "wall_s": wall, "cpu_s": cpu,
            "rejected": manifest["rejected"], "out_size": size, "cmd": " ".join(cmd)}


def run_img2dataset(args: argparse.Namespace, table: Path, out: Path, env: dict[str, str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    exe = I2D_VENV / "bin/img2dataset"
    if not exe.is_file():
        raise SystemExit(f"img2dataset missing: run `bash benchmarks/setup_img2dataset.sh {I2D_VENV}` first")
    cmd = [str(exe), "--url_list", str(table), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
           "--processes_count", str(args.processes), "--thread_count", str(args.threads),
           "--image_size", str(args.image_size), "--resize_mode", "keep_ratio",
           "--number_sample_per_shard", str(args.shard_size), "--timeout", "30", "--retries", "2",
           "--enable_wandb", "False", "--distributor", "multiprocessing"]
    wall, cpu = _timed(cmd, env, out.with_name(out.name + ".log"))
    samples, size = _count_tar_samples(out)
    failed = 0
    for stats in out.glob("*_stats.json"):
        failed += json.loads(stats.read_text()).get("failed_to_download", 0)
    return {"tool": "img2dataset", "samples": samples, "wall_s": wall, "cpu_s": cpu,
            "rejected": {"failed_to_download": failed} if failed else {}, "out_size": size,
            "cmd": " ".join(cmd)}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    return f"{model.group(1).strip() if model else platform.processor()}, {os.cpu_count()} CPUs, {platform.system()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=0,
                        help="URL table rows, cycling over the corpus (default: one per image)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each tool")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench/data_prep_vs_img2dataset"))
    parser.add_argument("--only", choices=("data-prep", "img2dataset"), help="run one tool only")
    parser.add_argument("--executor", choices=("auto", "local", "ray"), default="auto",
                        help="data-prep's --executor (auto: the local process pool here)")
    parser.add_argument("--data-prep-pythonpath", default="",
                        help="PYTHONPATH for data-prep only: a folder with Pillow-SIMD's PIL measures it "
                             "without replacing Pillow in the project's venv (RESULTS.md, data-prep)")
    parser.add_argument("--out", type=Path, help="append JSON lines with every run here")
    args = parser.parse_args()

    paths = build_corpus(args.workdir / f"corpus{args.images}", args.images)
    files = {p.name: p.read_bytes() for p in paths}
    mean_kb = sum(map(len, files.values())) / len(files) / 1024
    server = Server(files)
    num_rows = args.rows or len(files)
    table = args.workdir / f"urls{num_rows}.parquet"
    write_url_table(table, server.base, sorted(files), num_rows)
    # Everything stays on 127.0.0.1: no proxies, no update checks, an embedded single-machine Ray.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "NO_ALBUMENTATIONS_UPDATE": "1",
           "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost", "WANDB_MODE": "disabled"}
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "RAY_ADDRESS"):
        env.pop(var, None)
    print(f"machine: {machine()}")
    print(f"corpus: {len(files)} JPEGs, longer side {LONG_SIDE} px, mean {mean_kb:.0f} KB, served at "
          f"{server.base}; {num_rows} URL rows")
    runners = [("data-prep", run_data_prep), ("img2dataset", run_img2dataset)]
    if args.only:
        runners = [r for r in runners if r[0] == args.only]
    results: dict[str, list[dict]] = {name: [] for name, _ in runners}
    try:
        for round_index in range(args.rounds):
            for name, runner in runners:
                load_before = os.getloadavg()[0]  # the machine is often shared: say how busy it was
                row = runner(args, table, args.workdir / f"out-{name}", env)
                row.update(round=round_index, samples_per_s=row["samples"] / row["wall_s"],
                           load_1min=(load_before, os.getloadavg()[0]),
                           samples_per_cpu_s=row["samples"] / max(row["cpu_s"], 1e-9),
                           processes=args.processes, threads=args.threads, rows=num_rows,
                           executor=args.executor if name == "data-prep" else None,
                           pythonpath=args.data_prep_pythonpath if name == "data-prep" else None)
                results[name].append(row)
                print(f"round {round_index} {name:12s} {row['samples']:5d} samples  {row['wall_s']:6.1f} s  "
                      f"{row['samples_per_s']:7.1f} samples/s  {row['cpu_s']:6.1f} CPU-s "
                      f"({row['samples_per_cpu_s']:.1f} samples/CPU-s)  "
                      f"out {row['out_size']}  rejected {row['rejected']}  "
                      f"load {row['load_1min'][0]:.1f} -> {row['load_1min'][1]:.1f}", flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps({**row, "machine": machine()}) + "\n")
    finally:
        server.close()
    best = {name: max(rows, key=lambda r: r["samples_per_s"]) for name, rows in results.items()}
    print("\n| tool | samples | wall s (best) | samples/s (best) | all rounds samples/s | samples per CPU-s (best) |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        rounds = ", ".join(f"{r['samples_per_s']:.1f}" for r in rows)
        print(f"| {name} | {best[name]['samples']} | {best[name]['wall_s']:.1f} | "
              f"{best[name]['samples_per_s']:.1f} | {rounds} | "
              f"{max(r['samples_per_cpu_s'] for r in rows):.1f} |")
    if len(best) == 2:
        ratio = best["data-prep"]["samples_per_s"] / best["img2dataset"]["samples_per_s"]
        cpu_ratio = (max(r["samples_per_cpu_s"] for r in results["data-prep"])
                     / max(r["samples_per_cpu_s"] for r in results["img2dataset"]))
        print(f"\nratio data-prep / img2dataset: {ratio:.2f}x samples/s (goal >= 2x), {cpu_ratio:.2f}x samples "
              f"per CPU-second  ({args.processes} processes x {args.threads} threads, shorter side "
              f"{args.image_size}, {num_rows} rows over {len(files)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
