"""The one data_prep module that touches a model: CLIP scores of image-text pairs (and, in the same decode,
the pHashes data_prep/near_dup.py compares), in-process or on a pool of Ray actors that each load the
checkpoint once. Imported only when `data-prep filter` (or image-text with curation flags) runs, so
`data-prep` otherwise never imports torch or a model.

CLIP score (DataComp's): the cosine similarity of the L2-normalised image and text embeddings, computed with
the checkpoint's own evaluation transform and tokenizer, exactly as `launch eval` resolves any REF (our run
directory or checkpoint, an exported file, an open_clip weights file with --model)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from data_prep.near_dup import crop_variant_hashes, decode_rgb, is_flat, phash

# (encoded image bytes, caption or None)
Pair = tuple[bytes, "str | None"]


@dataclass(frozen=True)
class Scored:
    """What one sample of a batch came to: its pHash and CLIP score, or why it has none."""

    phash: int | None = None
    """None for an image too uniform to hash (near_dup.is_flat) or one that did not decode."""
    clip_score: float | None = None
    problem: str | None = None
    """'corrupt_image' or 'missing_caption' (the reasons pipeline.data counts under the same names)."""


class Curator:
    """Decodes each image once, hashes it and (with a checkpoint) scores it against its caption. The body of the
    Ray actors, and the in-process worker without Ray."""

    def __init__(self, checkpoint: str | None, model_name: str | None = None, num_threads: int | None = None):
        self._resolved = None
        self._device = "cpu"
        if checkpoint is None:
            return
        import torch

        from pipeline.evaluation.resolver import resolve

        if num_threads:
            torch.set_num_threads(num_threads)  # one actor per CPU: no oversubscription
        resolved = resolve(checkpoint, model_name)
        if resolved.kind != "clip" or resolved.tokenizer is None:
            raise ValueError(f"--checkpoint {checkpoint}: a {resolved.kind} model; CLIP scores need an "
                             "image-text model (model.kind clip)")
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        resolved.model.to(self._device)
        self._resolved = resolved

    def describe(self) -> dict:
        """What the manifest records about the scoring model."""
        r = self._resolved
        if r is None:
            return {}
        return {"model_name": r.model_name, "source": r.source, "step": r.step,
                "content_sha256": r.content_sha256, "device": self._device}

    def process(self, batch: Sequence[Pair]) -> list[Scored]:
        images, results = [], []
        for data, caption in batch:
            try:
                image = decode_rgb(data)
            except Exception:  # PIL raises many types for corrupt data
                results.append(Scored(problem="corrupt_image"))
                continue
            results.append(Scored(phash=None if is_flat(image) else phash(image)))
            images.append((len(results) - 1, image, caption))
        if self._resolved is None:
            return results
        scorable = [(i, image, caption) for i, image, caption in images if caption and caption.strip()]
        for i, _, caption in images:
            if not (caption and caption.strip()):
                results[i] = Scored(phash=results[i].phash, problem="missing_caption")
        if scorable:
            scores = self._scores([image for _, image, _ in scorable], [c for _, _, c in scorable])
            for (i, _, _), score in zip(scorable, scores):
                results[i] = Scored(phash=results[i].phash, clip_score=score)
        return results

    def _scores(self, images: list, captions: list[str]) -> list[float]:
        import torch
        import torch.nn.functional as F

        r = self._resolved
        with torch.no_grad():
            pixels = torch.stack([r.preprocess(image) for image in images]).to(self._device)
            tokens = r.tokenizer(captions).to(self._device)
            image_features = F.normalize(r.model.encode_image(pixels).float(), dim=-1)
            text_features = F.normalize(r.model.encode_text(tokens).float(), dim=-1)
        return (image_features * text_features).sum(dim=-1).cpu().tolist()

    def eval_hashes(self, images: Sequence[bytes]) -> list[list[int] | None]:
        """Crop-variant pHashes of evaluation images (None for one that does not decode or is flat)."""
        out: list[list[int] | None] = []
        for data in images:
            try:
                image = decode_rgb(data)
            except Exception:  # an unreadable eval image cannot contaminate anything
                out.append(None)
                continue
            out.append(None if is_flat(image) else crop_variant_hashes(image))
        return out


def windowed_map(pool, method: str, batches: Iterable[Sequence], window: int) -> Iterator[list]:
    """`actor.<method>(batch)` for each batch on a Ray ActorPool, results in order, taking a batch from
    `batches` only while fewer than `window` are out: ActorPool.map submits every value first, so the driver
    would hold every image of a corpus before the first result."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = 0
    for batch in batches:
        pool.submit(lambda actor, value: getattr(actor, method).remote(value), batch)
        out += 1
        if out == window:
            yield pool.get_next()
            out -= 1
    for _ in range(out):
        yield pool.get_next()


class CuratorPool:
    """`map(method, batches)` in order, on one in-process Curator or on a Ray ActorPool of them."""

    def __init__(self, checkpoint: str | None, model_name: str | None, num_workers: int, address: str | None):
        self._ray_started = False
        self._pool = None
        if num_workers == 1 and address is None:
            self._local = Curator(checkpoint, model_name)
            self.description = self._local.describe()
            return
        import ray
        from ray.util import ActorPool

        from data_prep.ray_runner import ensure_ray

        self._ray_started = ensure_ray(num_workers, address or os.environ.get("RAY_ADDRESS") or None)
        gpus = ray.cluster_resources().get("GPU", 0)
        # A GPU per actor where the cluster has them (the model runs there); else one CPU each, torch on one thread.
        options = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
        remote = ray.remote(**options)(Curator)
        if checkpoint is not None and "://" not in checkpoint and os.path.exists(checkpoint):
            checkpoint = os.path.abspath(checkpoint)  # actors need not share the driver's working directory
        threads = None if gpus >= 1 else 1
        actors = [remote.remote(checkpoint, model_name, threads) for _ in range(num_workers)]
        try:
            self.description = ray.get(actors[0].describe.remote())  # a load error surfaces here, once
        except ray.exceptions.RayActorError as exc:
            lines = [line for line in str(exc).splitlines() if "Error:" in line]
            raise ValueError(f"the scoring model did not load ({lines[-1].strip() if lines else exc})") from None
        self._actors = actors
        self._pool = ActorPool(actors)

    def map(self, method: str, batches: Iterable[Sequence]) -> Iterator[list]:
        if self._pool is None:
            call: Callable = getattr(self._local, method)
            for batch in batches:
                yield call(batch)
            return
        # Two batches per actor in flight: each has its next one waiting when it finishes one.
        yield from windowed_map(self._pool, method, batches, window=2 * len(self._actors))

    def close(self) -> None:
        if self._pool is None:
            return
        import ray

        for actor in self._actors:  # their CPUs (or GPUs) go back to the cluster now, not at garbage collection
            ray.kill(actor)
        if self._ray_started:
            ray.shutdown()
