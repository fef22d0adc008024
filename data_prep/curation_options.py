"""What `data-prep filter` and `image-text --filter-checkpoint/--decontaminate/--near-dedup` curate by.

Kept apart from data_prep/filter.py (which imports the shard reader and the manifest writer) so the CLI can
build the options and ask `active` before deciding whether to import the filter at all: `active` is the one
place that says which options mean "curate"."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from data_prep.near_dup import EVAL_MAX_BITS, NEAR_DUP_MAX_BITS, check_max_bits


@dataclass(frozen=True)
class CurationOptions:
    """What to filter by; shared by `data-prep filter` and `image-text --filter-checkpoint ...`."""

    checkpoint: str | None = None
    """Any REF `launch eval` resolves; None: no CLIP scores (decontamination / near-dedup only)."""
    model_name: str | None = None
    """--model for weights files that do not name their architecture."""
    min_clip_score: float | None = None
    keep_fraction: float | None = None
    decontaminate: tuple[str, ...] = ()
    """Evaluation set folders (CLIP_benchmark layout or data-prep output) whose near-copies are dropped."""
    decontaminate_max_bits: int = EVAL_MAX_BITS
    near_dedup: bool = False
    near_dedup_max_bits: int = NEAR_DUP_MAX_BITS
    batch_size: int = 256
    num_workers: int = 1
    address: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.checkpoint is None and (self.min_clip_score is not None or self.keep_fraction is not None):
            raise ValueError("--min-clip-score/--keep-fraction need a checkpoint to score with")
        if self.checkpoint is not None and self.min_clip_score is None and self.keep_fraction is None:
            raise ValueError("a checkpoint scores pairs: give --min-clip-score S or --keep-fraction F")
        if self.min_clip_score is not None and self.keep_fraction is not None:
            raise ValueError("--min-clip-score and --keep-fraction exclude each other")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"--keep-fraction {self.keep_fraction}: expected 0 < F <= 1")
        if not self.active:
            return  # `image-text` without curation builds these too: its --workers is the job's to check
        if self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("--batch-size and --workers must be at least 1")
        check_max_bits(self.decontaminate_max_bits, "--decontaminate-max-bits")
        check_max_bits(self.near_dedup_max_bits, "--near-dedup-max-bits")  # before any image is scored

    @property
    def active(self) -> bool:
        return bool(self.checkpoint or self.decontaminate or self.near_dedup)


def checked_eval_dirs(values: Sequence[str] | None) -> tuple[str, ...]:
    """--decontaminate folders, each checked to exist (one line naming a missing one)."""
    for value in values or ():
        if not Path(value).is_dir():
            raise ValueError(f"--decontaminate {value}: no such evaluation set folder")
    return tuple(values or ())
