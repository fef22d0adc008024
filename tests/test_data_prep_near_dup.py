"""Near-duplicates within a corpus (data_prep/near_dup.py `near_duplicates`): first seen wins in input order,
exactly as a one-by-one scan of every earlier kept hash decides, at any band layout; and a bad threshold
stops the command before any image is scored."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.near_dup import _NEAR_DUP_PAIRS_PER_STEP, near_duplicates


def _brute_force(hashes: list[int | None], max_bits: int) -> list[tuple[int, int] | None]:
    kept: list[int] = []
    out: list[tuple[int, int] | None] = []
    for j, h in enumerate(hashes):
        if h is None:
            out.append(None)
            continue
        close = sorted(((h ^ hashes[i]).bit_count(), i) for i in kept if (h ^ hashes[i]).bit_count() <= max_bits)
        if close:
            out.append((close[0][1], close[0][0]))
        else:
            out.append(None)
            kept.append(j)
    return out


def _corpus(num: int, seed: int) -> list[int | None]:
    """Random hashes, a third of them copies of an earlier one with 0-12 bits flipped (chains of copies of
    copies included), and some rows without a hash."""
    rng = np.random.default_rng(seed)
    hashes: list[int | None] = []
    for j in range(num):
        roll = rng.random()
        if roll < 0.05:
            hashes.append(None)
        elif roll < 0.4 and any(h is not None for h in hashes):
            source = next(h for h in (hashes[int(rng.integers(0, j))] for _ in range(100)) if h is not None)
            flips = rng.choice(64, size=int(rng.integers(0, 13)), replace=False)
            hashes.append(source ^ sum(1 << int(b) for b in flips))
        else:
            hashes.append(int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)))
    return hashes


@pytest.mark.parametrize("max_bits", [0, 3, 8, 12])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_same_decisions_as_a_one_by_one_scan(max_bits, seed):
    hashes = _corpus(1500, seed)
    found = near_duplicates(hashes, max_bits)
    assert found == _brute_force(hashes, max_bits)
    assert sum(match is not None for match in found) > 20  # the corpus exercises it


def test_large_groups_are_compared_in_bounded_steps(monkeypatch):
    """Every hash in one band group (identical low bits), compared in steps of a few rows: the same answer."""
    import data_prep.near_dup as near_dup

    hashes = [h & ~0xFFFF for h in _corpus(600, 2) if h is not None]
    monkeypatch.setattr(near_dup, "_NEAR_DUP_PAIRS_PER_STEP", 1000)
    assert near_dup._NEAR_DUP_PAIRS_PER_STEP < _NEAR_DUP_PAIRS_PER_STEP
    assert near_duplicates(hashes, 8) == _brute_force(hashes, 8)


def test_no_hashes_or_one_is_nothing_to_compare():
    assert near_duplicates([], 8) == []
    assert near_duplicates([None, 5, None], 8) == [None, None, None]


def test_a_bad_threshold_stops_before_any_image_is_scored(digits_root, tmp_path, capsys, monkeypatch):
    from data_prep.clip_score import Curator

    monkeypatch.setattr(Curator, "process", lambda self, batch: pytest.fail("scored before the check"))
    out = tmp_path / "out"
    assert main(["filter", "--input", str(digits_root / "image_text" / "val"), "--output", str(out),
                 "--near-dedup", "--near-dedup-max-bits", "64", "--workers", "1", "--no-progress"]) == 2
    assert "--near-dedup-max-bits 64: expected 0..63" in capsys.readouterr().err
    assert not out.exists()
