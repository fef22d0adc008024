"""Near-duplicate images by perceptual hash (ImageHash's 64-bit DCT `phash`): against evaluation sets
(decontamination, reason `eval_near_duplicate`) and within a corpus (`near_duplicate`).

Why a perceptual hash and not an embedding cosine: the only embeddings at hand are the filtering CLIP's, and a
CLIP puts two different photos of one class close together (that is what it is trained for), so a cosine
threshold flags semantic neighbours, not copies; it also needs a checkpoint where decontamination should not.
A pHash measures the pixels, costs no model and 8 bytes per image. One pHash of the whole image survives
re-encoding and resizing (<= 4 of 64 bits on the test's images) but not a crop: 5 % off one side moves it by
~24 bits, as far as unrelated images. So each evaluation image is hashed under a grid of crops (0, 5 or 10 %
off each side, at most 10 % per axis: CROP_VARIANTS = 36 hashes), and a training image matches when it is
within `max_bits` of any of them. Measured on 15 photo tiles re-encoded (q50), resized (x0.75, x1.5),
cropped 3-7 % and cropped-then-resized: every copy within 8 bits; 15 other tiles and 400 digits at 16 bits or
more: the default EVAL_MAX_BITS = 10 sits in that gap. (benchmarks/RESULTS.md, "Curation"; note that
scikit-learn's digits hold distinct scans within 2 bits of each other, real near-duplicates at 8x8 pixels.)
Within a corpus only whole-image hashes are compared (NEAR_DUP_MAX_BITS = 8: re-encodes down to JPEG
quality 60 and resizes of those tiles moved them by at most 6 bits; distinct tiles were 16 or more apart).
A nearly uniform image (a patch of sky: its 32x32 grey thumbnail's standard deviation under FLAT_STD levels)
has no stable pHash: its DCT coefficients all sit near their median, so a JPEG re-encode flips 8-14 bits. Such
an image gets no hash: it is neither matched nor recorded (nor indexed as an evaluation image).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

EVAL_MAX_BITS = 10
NEAR_DUP_MAX_BITS = 8
FLAT_STD = 8.0
HASH_BITS = 64
# Fractions cut off (left, right) of one axis; every pair of a row and a column pair is one crop variant.
_CROP_PAIRS = ((0.0, 0.0), (0.0, 0.05), (0.0, 0.1), (0.05, 0.0), (0.05, 0.05), (0.1, 0.0))
CROP_VARIANTS = len(_CROP_PAIRS) ** 2
# Hamming distances computed at once when matching (bounds the temporary matrix to 128 MiB of uint64).
_MAX_PAIRS_PER_STEP = 1 << 24
_NEAR_DUP_PAIRS_PER_STEP = 1 << 17  # near_duplicates: ~1 MB temporaries per step (100k rows: 3.8 s at 1 << 13, 1.7 s here)


def decode_rgb(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def is_flat(image: Image.Image) -> bool:
    """Too uniform for a stable pHash (see the module docstring)."""
    return float(np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float32).std()) < FLAT_STD


def phash(image: Image.Image) -> int:
    """ImageHash's pHash of `image` as an unsigned 64-bit integer."""
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def crop_variant_hashes(image: Image.Image) -> list[int]:
    """pHashes of `image` under every crop of _CROP_PAIRS (the first is the whole image)."""
    width, height = image.size
    hashes = []
    for top, bottom in _CROP_PAIRS:
        for left, right in _CROP_PAIRS:
            box = (round(left * width), round(top * height), width - round(right * width),
                   height - round(bottom * height))
            hashes.append(phash(image.crop(box)))
    return hashes


def hamming(hashes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(len(hashes), len(others)) matrix of bit differences between uint64 hashes."""
    return np.bitwise_count(hashes[:, None] ^ others[None, :])


@dataclass
class EvalIndex:
    """The crop-variant hashes of every image of the evaluation sets, and which image each belongs to."""

    hashes: np.ndarray
    """uint64, CROP_VARIANTS per image."""
    owners: np.ndarray
    """Index into `keys` of each hash."""
    keys: list[str]
    """'EVAL_DIR_NAME/SHARD/KEY' of each evaluation image."""
    max_bits: int = EVAL_MAX_BITS

    @classmethod
    def build(cls, keys: Sequence[str], variant_hashes: Sequence[Sequence[int]], max_bits: int) -> "EvalIndex":
        hashes = np.array([h for hs in variant_hashes for h in hs], dtype=np.uint64)
        owners = np.array([i for i, hs in enumerate(variant_hashes) for _ in hs], dtype=np.int64)
        return cls(hashes, owners, list(keys), max_bits)

    def match(self, hashes: Sequence[int]) -> list[tuple[str, int] | None]:
        """For each hash, (the closest evaluation image's key, its distance in bits) when within max_bits."""
        found: list[tuple[str, int] | None] = []
        query = np.array(hashes, dtype=np.uint64)
        step = max(1, _MAX_PAIRS_PER_STEP // max(1, len(self.hashes)))
        for start in range(0, len(query), step):
            distances = hamming(query[start:start + step], self.hashes) if len(self.hashes) else None
            for row in range(min(step, len(query) - start)):
                if distances is None:
                    found.append(None)
                    continue
                best = int(np.argmin(distances[row]))
                bits = int(distances[row, best])
                found.append((self.keys[self.owners[best]], bits) if bits <= self.max_bits else None)
        return found


def check_max_bits(max_bits: int, flag: str) -> None:
    if not 0 <= max_bits < HASH_BITS:
        raise ValueError(f"{flag} {max_bits}: expected 0..{HASH_BITS - 1}")


def _bands(max_bits: int) -> list[tuple[int, int]]:
    """max_bits + 1 bit ranges covering the 64 bits: two hashes at most max_bits apart agree exactly on at
    least one of them (pigeonhole), so only hashes sharing a band's value need comparing."""
    bounds = np.linspace(0, HASH_BITS, max_bits + 2).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _close_pairs(hashes: np.ndarray, max_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(later, earlier, bits) index arrays of every pair of `hashes` within max_bits, earlier < later, each
    pair once: per band, the hashes sharing a band value are compared all against all in numpy (in steps of
    _NEAR_DUP_PAIRS_PER_STEP), instead of one Python comparison per pair."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for lo, hi in _bands(max_bits):
        values = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(values, kind="stable")  # stable: each group lists its hashes in input order
        splits = np.flatnonzero(np.diff(values[order])) + 1
        for group in np.split(order, splits):
            if len(group) < 2:
                continue
            members = hashes[group]
            step = max(1, _NEAR_DUP_PAIRS_PER_STEP // len(group))
            for start in range(1, len(group), step):
                stop = min(start + step, len(group))
                bits = hamming(members[start:stop], members[:stop - 1])  # row r: hash start + r against earlier
                close = bits <= max_bits
                close[:, start:] &= np.tri(stop - start, stop - start - 1, -1, dtype=bool)  # only earlier ones
                hit = np.flatnonzero(close.any(axis=1))  # close pairs are rare: index only their rows
                later, earlier = np.nonzero(close[hit])
                later = hit[later]
                found.append((group[start + later], group[earlier], bits[later, earlier]))
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    later, earlier, bits = (np.concatenate(parts) for parts in zip(*found))
    # A pair agreeing on several bands was found in each: once, ordered by later, then bits, then earlier.
    order = np.lexsort((earlier, bits, later))
    later, earlier, bits = later[order], earlier[order], bits[order]
    first = np.ones(len(later), dtype=bool)
    first[1:] = (later[1:] != later[:-1]) | (earlier[1:] != earlier[:-1]) | (bits[1:] != bits[:-1])
    return later[first], earlier[first], bits[first]


def near_duplicates(hashes: Sequence[int | None], max_bits: int = NEAR_DUP_MAX_BITS) -> list[tuple[int, int] | None]:
    """First seen wins, in input order: for each hash, (the index of the closest earlier *kept* hash within
    max_bits, the bits between them; ties: the earliest) when it repeats one, else None (kept, or no hash).
    A repeat claims nothing: a hash close only to repeats is kept.

    Candidate pairs come from _close_pairs (pigeonhole bands compared in numpy): about
    (max_bits + 1) * N^2 / 2^(64 / (max_bits + 1) + 1) comparisons (N^2 / 30 at 8 bits), done in C, where a
    Python registry did each one in the interpreter (benchmarks/RESULTS.md, "Near-duplicates at scale")."""
    check_max_bits(max_bits, "--near-dedup-max-bits")
    present = [i for i, h in enumerate(hashes) if h is not None]
    result: list[tuple[int, int] | None] = [None] * len(hashes)
    if len(present) < 2:
        return result
    later, earlier, bits = _close_pairs(np.array([hashes[i] for i in present], dtype=np.uint64), max_bits)
    kept = np.ones(len(present), dtype=bool)
    starts = np.flatnonzero(np.r_[True, later[1:] != later[:-1]]) if len(later) else []
    ends = [*starts[1:], len(later)]
    for start, end in zip(starts, ends):  # later ascending: every earlier row's fate is already known
        for k in range(start, end):  # closest first, then earliest
            if kept[earlier[k]]:
                kept[later[k]] = False
                result[present[later[k]]] = (present[earlier[k]], int(bits[k]))
                break
    return result
