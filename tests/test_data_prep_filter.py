"""Curation inside the sharding step (#16): CLIP-score filtering with a checkpoint `launch eval` resolves, and
decontamination against evaluation sets (pHash, data_prep/near_dup.py). Every input row stays accounted for.

The CLIP is the smoke CLIP trained once for this module (`launch pretrain --no-ray`, a few dozen steps on the
digits corpus); decontamination needs no model and runs on photo tiles (scikit-learn's two sample photos) and
digits."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.filter import UNFILTERED

REPO = Path(__file__).resolve().parent.parent
SMOKE_CLIP = REPO / "configs" / "smoke_clip.yaml"
TRAIN_STEPS = 60


def _stats(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.stats.parquet"))],
                            promote_options="default")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _kept_keys(folder: Path) -> set[str]:
    table = _stats(folder)
    return {k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist()) if s == "ok"}


def _accounted(manifest: dict) -> bool:
    return manifest["num_samples"] + sum(manifest["rejected"].values()) == manifest["num_input_rows"]


# -- CLIP scores --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_clip(digits_root, tmp_path_factory) -> Path:
    """A run directory of the smoke CLIP after TRAIN_STEPS steps (one process, no Ray)."""
    out = tmp_path_factory.mktemp("filter_clip")
    overrides = {
        "run.output_dir": out, "run.name": "clip", "run.log_every_steps": 20,
        "data.train": f"{digits_root}/image_text/train", "data.val": f"{digits_root}/image_text/val",
        "eval.zeroshot": "[]", "eval.at_end": "false", "schedule.max_steps": TRAIN_STEPS,
        "schedule.warmup_epochs": 0, "checkpoint.every_steps": TRAIN_STEPS, "ray.num_workers": 1,
    }
    cmd = [sys.executable, "-m", "launch", "pretrain", "--no-ray", "--config", str(SMOKE_CLIP)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "clip"


@pytest.mark.integration
def test_a_trained_clip_scores_matching_captions_above_mismatched(smoke_clip, digits_root):
    from data_prep.clip_score import Curator
    from pipeline.data.reader import TarSamples
    from pipeline.data.shards import resolve_shards

    samples = TarSamples()
    pairs = [samples.read(s.path, i) for s in resolve_shards(f"{digits_root}/image_text/val")
             for i in range(s.num_samples)][:200]
    labels = [json.loads(p["json"])["caption"] for p in pairs]
    digits = [int(json.loads(p["json"])["source_row"]) for p in pairs]  # only to pair up different samples
    assert len(set(digits)) == len(pairs)
    captions = [p["txt"].decode() for p in pairs]
    # A mismatched caption names another digit: the caption of the next sample whose class differs.
    classes = [_digit_class(c) for c in labels]
    others = [next(captions[j % len(pairs)] for j in range(i + 1, i + len(pairs))
                   if classes[j % len(pairs)] != classes[i]) for i in range(len(pairs))]
    curator = Curator(str(smoke_clip))
    matched = [r.clip_score for r in curator.process([(p["jpg"], c) for p, c in zip(pairs, captions)])]
    mismatched = [r.clip_score for r in curator.process([(p["jpg"], c) for p, c in zip(pairs, others)])]
    wins = np.mean([a > b for a, b in zip(matched, mismatched)])
    assert np.mean(matched) > np.mean(mismatched) and wins > 0.7, (np.mean(matched), np.mean(mismatched), wins)


def _digit_class(caption: str) -> str:
    from data_prep.samples.digits import CLASSNAMES

    words = caption.replace(".", " ").split()
    return next(w if w in CLASSNAMES else CLASSNAMES[int(w)] for w in reversed(words)
                if w in CLASSNAMES or w.isdigit())


@pytest.mark.integration
def test_a_filter_at_the_median_keeps_half_and_accounts_for_every_row(smoke_clip, digits_root, tmp_path):
    source = digits_root / "image_text" / "val"
    out = tmp_path / "top_half"
    assert main(["filter", "--input", str(source), "--output", str(out), "--checkpoint", str(smoke_clip),
                 "--keep-fraction", "0.5", "--batch-size", "64", "--no-progress"]) == 0
    manifest, stats = _manifest(out), _stats(out)
    num_rows = _manifest(source)["num_samples"]  # the digits corpus: one sample per row
    assert manifest["num_input_rows"] == num_rows == stats.num_rows and _accounted(manifest)
    assert manifest["num_samples"] == num_rows // 2 and manifest["rejected"] == {"clip_score_below": num_rows // 2}
    scores = stats.column("clip_score").to_pylist()
    status = stats.column("status").to_pylist()
    assert None not in scores  # every row's score, kept or not
    kept = [s for s, st in zip(scores, status) if st == "ok"]
    dropped = [s for s, st in zip(scores, status) if st == "clip_score_below"]
    assert min(kept) >= max(dropped)
    cut = manifest["options"]["filter"]["clip_score_cut"]
    assert cut == pytest.approx(min(kept), abs=1e-5)
    assert main(["verify", str(out)]) == 0
    # The same cut as a threshold keeps the same rows, in one more run; the shards hold exactly those samples.
    again = tmp_path / "threshold"
    assert main(["filter", "--input", str(source), "--output", str(again), "--checkpoint", str(smoke_clip),
                 "--min-clip-score", str(cut - 1e-6), "--no-progress"]) == 0
    assert _kept_keys(again) == _kept_keys(out)
    assert sorted(p.name for p in again.glob("*.tar")) == sorted(p.name for p in out.glob("*.tar"))
    for tar in out.glob("*.tar"):
        assert tar.read_bytes() == (again / tar.name).read_bytes()


def _caption_table(digits_root: Path, folder: Path, num_rows: int) -> Path:
    """A CSV of image paths and captions (the first rows of the digits' val shards, as PNG files)."""
    from pipeline.data.reader import TarSamples
    from pipeline.data.shards import resolve_shards

    samples = TarSamples()
    (folder / "images").mkdir(parents=True)
    paths, captions = [], []
    raws = [samples.read(s.path, i) for s in resolve_shards(f"{digits_root}/image_text/val")
            for i in range(s.num_samples)][:num_rows]
    for i, raw in enumerate(raws):
        Image.open(io.BytesIO(raw["jpg"])).save(folder / "images" / f"{i}.png")
        paths.append(f"images/{i}.png")
        captions.append(raw["txt"].decode())
    pa_csv.write_csv(pa.table({"file": paths, "caption": captions}), folder / "captions.csv")
    return folder / "captions.csv"


@pytest.mark.integration
def test_filtering_inside_image_text_keeps_what_filtering_afterwards_keeps(smoke_clip, digits_root, tmp_path,
                                                                           ray_session):
    table = _caption_table(digits_root, tmp_path / "table", 120)
    common = ["image-text", "--input", str(table), "--caption-col", "caption", "--path-col", "file",
              "--image-size", "32", "--shard-size", "50", "--no-progress"]
    one_pass = tmp_path / "one_pass"
    assert main([*common, "--output", str(one_pass), "--filter-checkpoint", str(smoke_clip),
                 "--keep-fraction", "0.3"]) == 0
    plain = tmp_path / "plain"
    assert main([*common, "--output", str(plain)]) == 0
    after = tmp_path / "after"
    # Scored afterwards on two Ray actors (each loads the model once) instead of in-process.
    assert main(["filter", "--input", str(plain), "--output", str(after), "--checkpoint", str(smoke_clip),
                 "--keep-fraction", "0.3", "--workers", "2", "--no-progress"]) == 0
    assert _kept_keys(one_pass) == _kept_keys(after) and len(_kept_keys(after)) == 36
    for folder in (one_pass, after):
        manifest = _manifest(folder)
        assert manifest["num_input_rows"] == 120 and _accounted(manifest)
        assert manifest["rejected"] == {"clip_score_below": 84}
    assert (one_pass / UNFILTERED / "manifest.json").is_file()  # kept: another cut needs no second download


# -- decontamination ----------------------------------------------------------------------------------------


def _photo_tiles(size_px: int = 128) -> list[Image.Image]:
    """Non-overlapping tiles of scikit-learn's two sample photos, leaving out the near-uniform ones (patches
    of sky: nobody's evaluation image, and without a stable pHash; see test_a_uniform_image_gets_no_hash)."""
    from sklearn.datasets import load_sample_images

    from data_prep.near_dup import is_flat

    tiles = []
    for photo in (Image.fromarray(a) for a in load_sample_images().images):
        for top in range(0, photo.height - size_px + 1, size_px):
            for left in range(0, photo.width - size_px + 1, size_px):
                tiles.append(photo.crop((left, top, left + size_px, top + size_px)))
    return [tile for tile in tiles if not is_flat(tile)]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _copies(image: Image.Image) -> dict[str, Image.Image]:
    """What a scraped copy of an evaluation image looks like: re-encoded, resized, slightly cropped."""
    w, h = image.size
    return {
        "reencoded": _jpeg(image, 50),
        "smaller": _jpeg(image.resize((w * 3 // 4, h * 3 // 4), Image.BICUBIC), 85),
        "larger": _jpeg(image.resize((w * 3 // 2, h * 3 // 2), Image.BICUBIC), 85),
        "cropped": _jpeg(image.crop((round(0.05 * w), 0, w, h - round(0.03 * h))), 85),
        "cropped_resized": _jpeg(image.crop((round(0.04 * w), round(0.02 * h), w - round(0.03 * w), h))
                                 .resize((100, 98), Image.BICUBIC), 80),
    }


def _write_table(folder: Path, images: dict[str, Image.Image]) -> Path:
    (folder / "images").mkdir(parents=True)
    for name, image in images.items():
        image.save(folder / "images" / f"{name}.png")
    names = list(images)
    pa_csv.write_csv(pa.table({"file": [f"images/{n}.png" for n in names], "caption": names,
                               "name": names}), folder / "table.csv")
    return folder / "table.csv"


@pytest.fixture(scope="module")
def tile_eval_set(tmp_path_factory) -> tuple[Path, list[Image.Image], list[Image.Image]]:
    """An eval set (CLIP_benchmark layout, `data-prep eval-set zeroshot`) of every other photo tile; the
    tiles left out are unrelated images."""
    root = tmp_path_factory.mktemp("tiles")
    tiles = _photo_tiles()
    evaluated, unrelated = tiles[::2], tiles[1::2]
    for i, tile in enumerate(evaluated):
        (root / "tree" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        tile.save(root / "tree" / f"class{i % 2}" / f"tile{i:02d}.png")
    assert main(["eval-set", "zeroshot", "--input", str(root / "tree"), "--output", str(root / "eval"),
                 "--image-size", "128", "--no-progress"]) == 0
    return root / "eval", evaluated, unrelated


def test_decontamination_catches_every_copy_of_an_eval_image_and_nothing_else(tile_eval_set, digits_root,
                                                                              tmp_path):
    from pipeline.data.reader import TarSamples
    from pipeline.data.shards import resolve_shards

    eval_dir, evaluated, unrelated = tile_eval_set
    images: dict[str, Image.Image] = {}
    for i, tile in enumerate(evaluated):
        images.update({f"copy{i:02d}_{kind}": copy for kind, copy in _copies(tile).items()})
    images.update({f"unrelated{i:02d}": tile for i, tile in enumerate(unrelated)})
    samples = TarSamples()
    for shard in resolve_shards(f"{digits_root}/image_text/train"):
        for i in range(0, shard.num_samples, 4):
            images[f"digit_{Path(shard.path).stem}_{i}"] = Image.open(io.BytesIO(samples.read(shard.path, i)["jpg"]))
    table = _write_table(tmp_path / "table", images)
    out = tmp_path / "out"
    assert main(["image-text", "--input", str(table), "--output", str(out), "--caption-col", "caption",
                 "--path-col", "file", "--image-size", "128", "--decontaminate", str(eval_dir),
                 "--no-progress"]) == 0
    stats = _stats(out)
    rows = {n: (s, d) for n, s, d in zip(
        _names(out, stats), stats.column("status").to_pylist(), stats.column("detail").to_pylist())}
    caught = {n for n, (s, _) in rows.items() if s == "eval_near_duplicate"}
    assert caught == {n for n in images if n.startswith("copy")}, sorted(caught ^ {n for n in images if n.startswith("copy")})
    # The recorded match is the evaluation image the copy was made from.
    eval_keys = _eval_keys_by_tile(eval_dir)
    for name in caught:
        assert rows[name][1].startswith(f"eval/{eval_keys[int(name[4:6])]} "), (name, rows[name][1])
    manifest = _manifest(out)
    assert _accounted(manifest) and manifest["rejected"] == {"eval_near_duplicate": 5 * len(evaluated)}


def _names(out: Path, stats: pa.Table) -> list[str]:
    """The table's `name` column for each stats row (through the unfiltered job's stats: same keys)."""
    by_key = {}
    from pipeline.data.reader import TarSamples
    from pipeline.data.shards import resolve_shards

    samples = TarSamples()
    for shard in resolve_shards(str(out / UNFILTERED)):
        for i in range(shard.num_samples):
            raw = samples.read(shard.path, i)
            by_key[raw["__key__"]] = json.loads(raw["json"])["name"]
    return [by_key[k] for k in stats.column("key").to_pylist()]


def _eval_keys_by_tile(eval_dir: Path) -> dict[int, str]:
    """Tile number -> 'SHARD/KEY' of it in the eval set (its json names the source file)."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted((eval_dir / "test").glob("*.stats.parquet"))],
                             promote_options="default")
    found = {}
    for path, key in zip(table.column("path").to_pylist(), table.column("key").to_pylist()):
        shard = next(p.name for p in (eval_dir / "test").glob("*.tar") if key in _tar_keys(p))
        found[int(Path(path).stem[4:])] = f"{shard}/{key}"
    return found


def _tar_keys(path: Path) -> set[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar}


def test_near_duplicates_within_the_corpus_keep_the_first(tile_eval_set, tmp_path):
    _, evaluated, unrelated = tile_eval_set
    images = {f"tile{i:02d}": tile for i, tile in enumerate(evaluated + unrelated)}
    images.update({f"tile{i:02d}_again": _jpeg(tile.resize((96, 96), Image.BICUBIC), 60)
                   for i, tile in enumerate(unrelated[:6])})
    table = _write_table(tmp_path / "table", images)
    out = tmp_path / "out"
    assert main(["image-text", "--input", str(table), "--output", str(out), "--caption-col", "caption",
                 "--path-col", "file", "--image-size", "128", "--no-shuffle", "--near-dedup",
                 "--no-progress"]) == 0
    stats = _stats(out)
    names = _names(out, stats)
    status = Counter(zip(names, stats.column("status").to_pylist()))
    dropped = sorted(n for (n, s) in status if s == "near_duplicate")
    assert dropped == sorted(f"tile{i:02d}_again" for i in range(6)), dropped
    manifest = _manifest(out)
    assert _accounted(manifest) and manifest["rejected"] == {"near_duplicate": 6}


def test_a_uniform_image_gets_no_hash_and_is_neither_matched_nor_recorded():
    from data_prep.clip_score import Curator
    from data_prep.near_dup import near_duplicates

    sky = Image.new("RGB", (64, 64), (120, 160, 220))
    noisy = np.clip(np.asarray(sky, dtype=np.int16) + np.random.default_rng(0).integers(-3, 4, (64, 64, 3)), 0, 255)
    encoded = []
    for image in (sky, Image.fromarray(noisy.astype(np.uint8)), _photo_tiles()[0]):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        encoded.append((buffer.getvalue(), None))
    scored = Curator(None).process(encoded)
    assert [s.phash is None for s in scored] == [True, True, False]
    photo = scored[2].phash
    # 9 bits apart: another image; the flat ones have no hash, so they match nothing and claim nothing.
    assert near_duplicates([photo, scored[0].phash, photo ^ 0b1011, photo ^ 0x1FF], 8) == [None, None, (0, 3), None]


# -- resume -------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_filter_stopped_mid_job_resumes_without_rescoring_and_ends_as_an_uninterrupted_run(
        smoke_clip, digits_root, tmp_path, monkeypatch, capsys):
    from data_prep import filter as filter_module
    from data_prep.clip_score import Curator

    table = _caption_table(digits_root, tmp_path / "table", 120)
    for i in (5, 77):  # rejected while sharding: their stats rows are carried over by the filter
        (tmp_path / "table" / "images" / f"{i}.png").unlink()
    shards = tmp_path / "shards"
    assert main(["image-text", "--input", str(table), "--output", str(shards), "--caption-col", "caption",
                 "--path-col", "file", "--image-size", "32", "--shard-size", "30", "--no-progress",
                 "--no-report"]) == 0
    shard_sizes = [s["num_samples"] for s in _manifest(shards)["shards"]]
    assert len(shard_sizes) == 4 and sum(shard_sizes) == 118
    # keep-fraction (a cut over every score) and near-dedup (first seen in input order) decide across shards.
    command = ["filter", "--input", str(shards), "--checkpoint", str(smoke_clip), "--keep-fraction", "0.5",
               "--near-dedup", "--batch-size", "8", "--no-progress", "--no-report"]
    whole = tmp_path / "whole"
    assert main([*command, "--output", str(whole)]) == 0

    scored = {"rows": 0, "batches_left": None}
    real_process = Curator.process

    def counting_process(self, batch):
        if scored["batches_left"] == 0:
            raise RuntimeError("scorer lost")
        if scored["batches_left"] is not None:
            scored["batches_left"] -= 1
        scored["rows"] += len(batch)
        return real_process(self, batch)

    monkeypatch.setattr(Curator, "process", counting_process)
    out = tmp_path / "out"
    # Attempt 1 stops while scoring the second shard: the first shard's 4 batches of 8 are all in.
    scored["batches_left"] = -(-shard_sizes[0] // 8) + 1
    with pytest.raises(RuntimeError, match="scorer lost"):
        main([*command, "--output", str(out)])
    assert not (out / "manifest.json").exists()
    # Another cut into the same folder is refused, naming what differs.
    capsys.readouterr()
    assert main([*("0.3" if a == "0.5" else a for a in command), "--output", str(out)]) == 2
    assert "different job (keep_fraction differ)" in capsys.readouterr().err

    # Attempt 2 scores only the shards not finished, then stops after writing the first output shard.
    scored.update(rows=0, batches_left=None)
    real_write = filter_module.write_shard
    writes = []

    def failing_write(*args, **kwargs):
        if writes:
            raise OSError(28, "No space left on device")
        writes.append(args[0])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(filter_module, "write_shard", failing_write)
    assert main([*command, "--output", str(out)]) == 1
    assert scored["rows"] == sum(shard_sizes[1:])
    assert [p.name for p in writes] == ["00000.tar"]
    done = {name: (out / name).stat().st_mtime_ns for name in ("00000.tar", "00000.stats.parquet")}

    # Attempt 3 scores nothing, keeps the finished partition and completes.
    monkeypatch.setattr(filter_module, "write_shard", real_write)
    scored.update(rows=0)
    assert main([*command, "--output", str(out)]) == 0
    assert scored["rows"] == 0
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in done.items())

    # The same outcome as one uninterrupted run: kept set, shards byte for byte, stats, manifest.
    assert _kept_keys(out) == _kept_keys(whole) and 0 < len(_kept_keys(out)) < 118
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in whole.glob("*.tar"))
    for tar in whole.glob("*.tar"):
        assert (out / tar.name).read_bytes() == tar.read_bytes()
    assert _stats(out).equals(_stats(whole))
    ignore = {"created_utc"}
    assert ({k: v for k, v in _manifest(out).items() if k not in ignore}
            == {k: v for k, v in _manifest(whole).items() if k not in ignore})
    # Every input row of the table exactly once.
    manifest, stats = _manifest(out), _stats(out)
    rows = list(zip(stats.column("source").to_pylist(), stats.column("source_row").to_pylist()))
    assert len(rows) == len(set(rows)) == manifest["num_input_rows"] == 120 and _accounted(manifest)
    assert {"clip_score_below", "near_duplicate", *_manifest(shards)["rejected"]} <= set(manifest["rejected"])
    assert main(["verify", str(out)]) == 0


@pytest.mark.integration
def test_image_text_with_curation_resumes_its_filter_and_recuts_on_new_flags(smoke_clip, digits_root, tmp_path,
                                                                             monkeypatch):
    from data_prep.clip_score import Curator

    table = _caption_table(digits_root, tmp_path / "table", 40)
    out = tmp_path / "out"
    command = ["image-text", "--input", str(table), "--caption-col", "caption", "--path-col", "file",
               "--image-size", "32", "--shard-size", "20", "--no-progress", "--no-report", "--output", str(out),
               "--filter-checkpoint", str(smoke_clip)]
    assert main([*command, "--keep-fraction", "0.5"]) == 0 and _manifest(out)["num_samples"] == 20
    scored = []
    real_process = Curator.process
    monkeypatch.setattr(Curator, "process", lambda self, batch: scored.append(len(batch)) or real_process(self, batch))
    assert main([*command, "--keep-fraction", "0.5"]) == 0 and scored == []  # the same job: nothing to score
    # Another cut filters OUTPUT anew from OUTPUT/.unfiltered (refusing would leave only "delete the folder").
    assert main([*command, "--keep-fraction", "0.25"]) == 0 and sum(scored) == 40
    manifest = _manifest(out)
    assert manifest["num_samples"] == 10 and manifest["rejected"] == {"clip_score_below": 30} and _accounted(manifest)
    assert main(["verify", str(out)]) == 0
