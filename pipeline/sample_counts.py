"""Every metric travels with the number of samples it was computed on: the scored count against the count
the data's manifest records. A shortfall (a truncated or missing shard, undecodable samples) is one warning
line, worded alike for training validation and `launch eval`, never a silently smaller denominator."""
from __future__ import annotations


def sample_shortfall(what: str, scored: int, expected: int | None, skipped: dict[str, int] | None,
                     listed_by: str) -> str | None:
    """One warning line when `scored` samples differ from the `expected` count `listed_by` records (a
    manifest: a truncated or missing shard, undecodable samples); None when they match or nothing is known.
    Training validation and `launch eval` word it alike."""
    if expected is None or scored == expected:
        return None
    if scored > expected:
        return f"{what} scored {scored} samples, more than the {expected} {listed_by} lists (a stale manifest?)"
    skipped = {reason: n for reason, n in (skipped or {}).items() if n}
    num_skipped = sum(skipped.values())
    parts = []
    if num_skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
        parts.append(f"{num_skipped} skipped ({reasons})")
    if expected - scored - num_skipped > 0:
        parts.append(f"{expected - scored - num_skipped} not read (missing or truncated shards?)")
    detail = "; ".join(parts) or "the rest were not read"
    return f"{what} scored {scored} of the {expected} samples {listed_by} lists: {detail}"
