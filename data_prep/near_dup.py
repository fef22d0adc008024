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
from typing import Iterable, Sequence

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


class NearDupRegistry:
    """First-seen-wins near-duplicates within a corpus: a hash within `max_bits` of an earlier one is a repeat.

    Lookups use the pigeonhole principle: split the 64 bits into max_bits + 1 bands; two hashes at most
    max_bits apart agree exactly on at least one band, so only hashes sharing a band value are compared."""

    def __init__(self, max_bits: int = NEAR_DUP_MAX_BITS) -> None:
        if not 0 <= max_bits < HASH_BITS:
            raise ValueError(f"--near-dedup-max-bits {max_bits}: expected 0..{HASH_BITS - 1}")
        self.max_bits = max_bits
        bounds = np.linspace(0, HASH_BITS, max_bits + 2).round().astype(int)
        self._bands = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        self._tables: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self._bands]

    def _band_values(self, value: int) -> Iterable[tuple[int, int]]:
        for index, (lo, hi) in enumerate(self._bands):
            yield index, (value >> lo) & ((1 << (hi - lo)) - 1)

    def claim(self, value: int, key: str) -> tuple[str, int] | None:
        """None when `value` is new here (it is recorded under `key`), else (the earlier key, distance in bits)."""
        for index, band in self._band_values(value):
            for other, other_key in self._tables[index].get(band, ()):
                bits = (value ^ other).bit_count()
                if bits <= self.max_bits:
                    return other_key, bits
        for index, band in self._band_values(value):
            self._tables[index].setdefault(band, []).append((value, key))
        return None
