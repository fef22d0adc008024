"""First-seen-wins image de-duplication by sha256, shared by all partitions of a job."""
from __future__ import annotations

from typing import Any, Iterable


class HashRegistry:
    """In-process registry (and, wrapped by ray.remote, the body of the shared Ray actor)."""

    def __init__(self, seen: Iterable[str] = ()) -> None:
        self._seen = set(seen)

    def claim(self, digests: list[str]) -> list[bool]:
        """True for each digest seen here for the first time (also within this batch)."""
        first = []
        for digest in digests:
            first.append(digest not in self._seen)
            self._seen.add(digest)
        return first


class RayHashRegistry:
    """Picklable proxy that Ray tasks call; one actor holds the set for the whole job."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    @classmethod
    def start(cls, seen: Iterable[str]) -> "RayHashRegistry":
        import ray

        actor = ray.remote(num_cpus=0)(HashRegistry).remote(list(seen))
        return cls(actor)

    def claim(self, digests: list[str]) -> list[bool]:
        import ray

        return ray.get(self._actor.claim.remote(digests))
