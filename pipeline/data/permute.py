"""A seeded permutation of [0, n) for any n, without a table: the epoch's block order.

A table of n indices would cost 4-8 bytes per block in every loader process (LAION-2B in single samples:
8 GB each); this is a balanced Feistel network on the smallest even number of bits that covers n, with
cycle-walking (a value that lands outside [0, n) is permuted again until it lands inside), which is a
bijection of [0, n) by construction. Rounds use splitmix64's finaliser keyed by the seed. Vectorised:
a loader maps a whole shuffle window at once.
"""
from __future__ import annotations

import numpy as np

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


class Permutation:
    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2  # even width: both halves alike; at most 4n values, <= 4 walks on average
        self.mask = np.uint64((1 << self.half) - 1)
        keys = np.random.SeedSequence(seed & 0xFFFFFFFFFFFFFFFF).generate_state(_ROUNDS, dtype=np.uint64)
        self.keys = [np.uint64(k) for k in keys]

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        z = right ^ key
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _once(self, values: np.ndarray, inverse: bool) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = values >> shift, values & self.mask
        if inverse:
            for key in reversed(self.keys):
                left, right = right ^ self._round(left, key), left
        else:
            for key in self.keys:
                left, right = right, left ^ self._round(right, key)
        return (left << shift) | right

    def _walk(self, values, inverse: bool) -> np.ndarray:
        out = np.asarray(values, dtype=np.uint64).copy()
        if out.size and int(out.max()) >= self.n:
            raise ValueError(f"values must lie in [0, {self.n})")
        pending = np.arange(out.size)
        with np.errstate(over="ignore"):  # uint64 products wrap, as splitmix64 intends
            while pending.size:
                out[pending] = self._once(out[pending], inverse)
                pending = pending[out[pending] >= np.uint64(self.n)]
        return out.astype(np.int64)

    def __call__(self, values) -> np.ndarray:
        """The images of `values` (an int or an array of ints in [0, n))."""
        return self._walk(np.atleast_1d(values), inverse=False)

    def inverse(self, values) -> np.ndarray:
        return self._walk(np.atleast_1d(values), inverse=True)
