"""CPU time of the epoch layout alone (position -> shard, sample), per position.

    .venv/bin/python benchmarks/layout_micro.py                       # this tree, shuffle_block 1
    .venv/bin/python benchmarks/layout_micro.py --block 64
    .venv/bin/python benchmarks/layout_micro.py --tree /tmp/before    # another checkout (e.g. `git archive`)

An ImageNet-sized epoch (1,281 shards of 1,000 samples) with a 5,000-position shuffle window; shards
are never opened. Compare with the ~460 us a 256 px sample costs to decode (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=None, help="repository root to import pipeline from")
    parser.add_argument("--block", type=int, default=None, help="shuffle_block (trees that have it)")
    parser.add_argument("--positions", type=int, default=200_000)
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    from pipeline.data.shards import Shard
    from pipeline.data.stream import EpochLayout

    shards = [Shard(f"/nowhere/{i:05d}.tar", 1000) for i in range(1281)]
    extra = {} if args.block is None else {"block_size": args.block}
    layout = EpochLayout(shards, 0, 0, True, 5000, **extra)
    start = time.process_time()
    for position in range(args.positions):
        layout.locate(position)
    per_position = (time.process_time() - start) / args.positions
    print(f"{per_position * 1e6:.2f} us per position (CPU), {args.positions} positions, block "
          f"{args.block or 'n/a'}, from {sys.modules['pipeline'].__file__}")


if __name__ == "__main__":
    main()
