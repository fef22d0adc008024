"""Why a sample was skipped: the one list of reason strings, and the exception that carries one.

Training (metrics.jsonl `skipped_samples`), in-training evaluation and `launch eval` (result JSON
`num_skipped`) count skips under these strings, so one bad sample reads the same everywhere. They are
plain strings in counters: a run directory written with older wording still reads, it just shows it.
"""
from __future__ import annotations

NO_IMAGE = "no image"
CORRUPT_IMAGE = "corrupt image"
NO_LABEL = "no label"
BAD_LABEL = "bad label"
NO_CAPTION = "no caption"
UNREADABLE_JSON = "no caption (unreadable json)"
CAPTION_NOT_UTF8 = "caption not utf-8"
EMPTY_CAPTION = "empty caption"
MISSING_SAMPLE = "sample missing from shard (unreadable tar or manifest count too large)"

REASONS = (NO_IMAGE, CORRUPT_IMAGE, NO_LABEL, BAD_LABEL, NO_CAPTION, UNREADABLE_JSON, CAPTION_NOT_UTF8,
           EMPTY_CAPTION, MISSING_SAMPLE)


class SkipSample(Exception):
    """Raised by a reader or decode function for a sample that must be skipped; the message is one of
    REASONS, and counters key on str(exception)."""
