"""`data-prep filter` holds a bounded number of images while it scores: batches are read as the scorers take
them (at most a window of in-flight batches ahead), not every unfinished shard's images before the first
batch is scored, which on a real corpus would hold the whole corpus in memory."""
from __future__ import annotations

import pytest

from data_prep.cli import main


def _samples_ahead(monkeypatch, curator_method: str) -> list[int]:
    """Samples read but not yet handed to `Curator.<curator_method>`, recorded at each batch it takes."""
    from data_prep import filter as filter_module
    from data_prep.clip_score import Curator

    counts = {"read": 0, "taken": 0}
    ahead: list[int] = []
    real_read, real_method = filter_module._read_sample, getattr(Curator, curator_method)

    def counting_read(*args, **kwargs):
        counts["read"] += 1
        return real_read(*args, **kwargs)

    def counting_method(self, batch):
        ahead.append(counts["read"] - counts["taken"])
        counts["taken"] += len(batch)
        return real_method(self, batch)

    monkeypatch.setattr(filter_module, "_read_sample", counting_read)
    monkeypatch.setattr(Curator, curator_method, counting_method)
    return ahead


def test_in_process_scoring_reads_at_most_one_batch_ahead(digits_root, tmp_path, monkeypatch):
    ahead = _samples_ahead(monkeypatch, "process")
    assert main(["filter", "--input", str(digits_root / "image_text" / "train"), "--output", str(tmp_path / "out"),
                 "--near-dedup", "--batch-size", "16", "--workers", "1", "--no-progress", "--no-report"]) == 0
    assert len(ahead) > 4
    assert max(ahead) <= 16, ahead[:3]


def test_the_evaluation_sets_are_hashed_as_they_are_read(digits_root, tmp_path, monkeypatch):
    """--decontaminate: the eval images are hashed a batch at a time as they are read, not all held first
    (ImageNet's 50,000 validation images would be ~6 GB of JPEG bytes in the driver)."""
    ahead = _samples_ahead(monkeypatch, "eval_hashes")
    assert main(["filter", "--input", str(digits_root / "image_text" / "val"), "--output", str(tmp_path / "out"),
                 "--decontaminate", str(digits_root / "zeroshot"), "--workers", "1", "--no-progress",
                 "--no-report"]) == 0
    assert len(ahead) > 2
    assert max(ahead) <= 64, ahead[:3]


def test_the_actor_pool_takes_at_most_its_window_of_batches_ahead(ray_session):
    from data_prep.clip_score import windowed_map

    @ray_session.remote(num_cpus=0)
    class Echo:
        def run(self, batch):
            return batch

    from ray.util import ActorPool

    taken = []

    def batches():
        for index in range(40):
            taken.append(index)
            yield [index]

    ahead = []
    results = []
    for result in windowed_map(ActorPool([Echo.remote(), Echo.remote()]), "run", batches(), window=4):
        ahead.append(len(taken) - len(results))
        results.append(result)
    assert results == [[i] for i in range(40)]  # in order
    assert max(ahead) <= 4


@pytest.mark.parametrize("window", [0, -1])
def test_a_window_below_one_is_refused(window):
    from data_prep.clip_score import windowed_map

    with pytest.raises(ValueError, match="window"):
        list(windowed_map(None, "run", iter([]), window=window))
