"""Near-duplicates within a corpus at scale (issue 16): `near_duplicates` (pigeonhole bands compared in numpy)
against the Python registry it replaced (NearDupRegistry, read from git at --before), same hashes, same
decisions, CPU seconds of one thread.

    .venv/bin/python benchmarks/near_dedup_scale.py [--rows 20000 100000 1000000] [--before 44f6b2d]

Hashes: uniform random 64-bit values, 30 % of rows a copy of an earlier row with 0-12 bits flipped (a corpus
with many near-copies; the numbers of pairs compared do not depend on it: they depend on the band groups'
sizes, ~N / 128 per band at the default 8 bits). The registry is skipped above --max-before rows (its time
grows as N^2: 1M rows would take hours).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.near_dup import NEAR_DUP_MAX_BITS, near_duplicates  # noqa: E402


def corpus(num: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, size=num, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    hashes |= rng.integers(0, 2, size=num).astype(np.uint64)
    copies = np.flatnonzero(rng.random(num) < 0.3)
    copies = copies[copies > 0]
    for j in copies:
        flips = rng.choice(64, size=int(rng.integers(0, 13)), replace=False)
        hashes[j] = hashes[int(rng.integers(0, j))] ^ np.uint64(sum(1 << int(b) for b in flips))
    return [int(h) for h in hashes]


def old_registry(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:data_prep/near_dup.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "near_dup_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("near_dup_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module.NearDupRegistry


def run_before(registry_class, hashes: list[int], max_bits: int) -> list[tuple[int, int] | None]:
    registry = registry_class(max_bits)
    out = []
    for index, value in enumerate(hashes):
        found = registry.claim(value, index)
        out.append(None if found is None else found)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000, 1_000_000])
    parser.add_argument("--before", default="44f6b2d", help="commit whose NearDupRegistry is the reference")
    parser.add_argument("--max-before", type=int, default=100_000)
    parser.add_argument("--max-bits", type=int, default=NEAR_DUP_MAX_BITS)
    args = parser.parse_args()
    registry_class = old_registry(args.before)
    print("| rows | near-duplicates | registry (before) CPU s | near_duplicates CPU s | speed-up | same dropped rows |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for num in args.rows:
        hashes = corpus(num)
        start = time.process_time()
        new = near_duplicates(hashes, args.max_bits)
        new_s = time.process_time() - start
        dropped = sum(match is not None for match in new)
        if num <= args.max_before:
            start = time.process_time()
            old = run_before(registry_class, hashes, args.max_bits)
            old_s = time.process_time() - start
            same = [m is None for m in old] == [m is None for m in new]
            print(f"| {num:,} | {dropped:,} | {old_s:.2f} | {new_s:.2f} | {old_s / new_s:.0f}x | {same} |", flush=True)
        else:
            print(f"| {num:,} | {dropped:,} | (skipped) | {new_s:.2f} | - | - |", flush=True)


if __name__ == "__main__":
    main()
