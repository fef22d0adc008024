"""`data-prep filter` (and the curation step of `data-prep image-text --filter-checkpoint/--decontaminate`):
shards in, fewer shards out, every row accounted for.

Two passes over the input shards. Pass 1 decodes every sample once on the curator pool
(data_prep/clip_score.py: in-process, or Ray actors that load the model once) for its pHash and CLIP score.
The decisions then need the whole corpus: `--keep-fraction` cuts at a quantile of all scores (DataComp's
"CLIP score, top 30 %"), and within-corpus near-duplicates are first-seen-wins in input order. Pass 2 copies
each kept sample's files byte for byte into a shard of the same name. (A fixed `--min-clip-score` could
decide in pass 1 already; one code path for both costs a second read of local tars, small beside the model.)

A row is dropped, in this order, as
  corrupt_image / missing_caption   nothing to hash or score,
  eval_near_duplicate               its pHash is within --decontaminate-max-bits of a crop of an evaluation
                                    image (data_prep/near_dup.py); `detail` names that image,
  clip_score_below                  under --min-clip-score, or outside the top --keep-fraction,
  near_duplicate                    within --near-dedup-max-bits of an earlier kept row; `detail` names it.
Every row's score goes into the stats parquet (`clip_score`), kept or not. When the input is a data-prep
folder its stats rows (those rejected upstream included) are carried over, so the output's manifest still
counts every row of the original tables: num_samples + sum(rejected) == num_input_rows.

Resume (data_prep/job.py's _job.json, as image-text): pass 1 writes each input shard's scores to OUTPUT/.scored/
once the shard is done, pass 2 each output shard's tar then its stats file; a rerun of the same job skips both."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from data_prep.curation_options import CurationOptions
from data_prep.job import JOB_FILE, JobReport, claim_output, write_identity
from data_prep.manifest import build_manifest, write_dataset_metadata
from data_prep.near_dup import EvalIndex, near_duplicates
from data_prep.partition import OK, STATS_SUFFIX, read_stats, write_stats
from data_prep.writer import Sample, ShardRecord, write_shard
from pipeline.data.reader import IMAGE_EXTENSIONS, TarSamples
from pipeline.data.shards import Shard, read_manifest, resolve_shards

CLIP_SCORE_BELOW = "clip_score_below"
EVAL_NEAR_DUPLICATE = "eval_near_duplicate"
NEAR_DUPLICATE = "near_duplicate"
SCORED_DIR = ".scored"
"""OUTPUT/.scored/NAME.stats.parquet: pass 1's outcome for input shard NAME (each sample's pHash and score, or
its problem), renamed into place once the whole shard is scored. A rerun reads it back instead of scoring again."""
# Options that only spread the work: they may change between attempts at one job (as image-text's fetch options).
_SCHEDULING_OPTIONS = ("batch_size", "num_workers", "address", "show_progress")


@dataclass
class _Row:
    """One input sample after pass 1."""

    shard: int
    position: int
    key: str
    phash: int | None = None
    clip_score: float | None = None
    status: str = OK
    detail: str = ""


@dataclass
class _InputShard:
    shard: Shard
    name: str
    rows: list[_Row] = field(default_factory=list)


def run_filter(input_spec: str, output: Path, options: CurationOptions,
               replace_other_filter: bool = False) -> JobReport:
    """Filter the shards of `input_spec` (a folder, glob or brace list) into `output`, resuming an earlier
    attempt at the same job there. `output` holding another filter job is an error, or with
    `replace_other_filter` that job's output is removed first."""
    from data_prep.clip_score import CuratorPool

    if not options.active:
        raise ValueError("nothing to filter by: give --checkpoint, --decontaminate or --near-dedup")
    start = time.monotonic()
    output = Path(output)
    upstream = read_manifest(input_spec)
    # A data-prep folder whose every row was rejected upstream has no shard, only stats to carry over.
    listed = [] if upstream and upstream.get("num_samples") == 0 else resolve_shards(input_spec)
    shards = [_InputShard(s, s.path.rsplit("/", 1)[-1]) for s in listed]
    _check_output(output, input_spec)
    pool = CuratorPool(options.checkpoint, options.model_name, options.num_workers, options.address)
    try:
        _claim(output, input_spec, shards, options, pool.description, replace_other_filter)
        index = _eval_index(options, pool)
        samples = TarSamples()
        num_scored = _score_all(shards, samples, pool, options, output / SCORED_DIR)
    finally:
        pool.close()
    cut = _decide(shards, index, options)
    upstream_stats = _upstream_stats(input_spec, upstream, shards)
    records, rejected, num_rows = _write_outputs(shards, samples, output, upstream_stats)
    for reason, count in _counted_outside_stats(upstream, upstream_stats).items():
        rejected[reason] = rejected.get(reason, 0) + count
        num_rows += count
    source = {"input": input_spec, "upstream_manifest": bool(upstream_stats)}
    recorded = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("show_progress", "address")}
    recorded.update(scoring_model=pool.description, clip_score_cut=cut)
    manifest = build_manifest((upstream or {}).get("kind", "image_text"), records, source=source,
                              options={"filter": recorded, **({"upstream": upstream["options"]}
                                                              if upstream and "options" in upstream else {})},
                              rejected=rejected, classnames=(upstream or {}).get("classnames"))
    manifest["num_input_rows"] = num_rows
    manifest["stats_files"] = sorted(p.name for p in output.glob(f"*{STATS_SUFFIX}"))
    write_dataset_metadata(output, manifest, split="train", dataset_name=output.name)
    return JobReport(manifest, num_scored, time.monotonic() - start)


def _check_output(output: Path, input_spec: str) -> None:
    if Path(input_spec).resolve() == output.resolve():
        raise ValueError(f"--output {output}: is the input folder; filtered shards go to a new folder")
    if (output / JOB_FILE).is_file():
        return  # an earlier attempt at a job: _claim resumes it if it is this one
    old = json.loads((output / "manifest.json").read_text()) if (output / "manifest.json").is_file() else None
    if any(output.glob("*.tar")) and not (old and "filter" in old.get("options", {})):
        raise ValueError(f"--output {output}: holds shards that `data-prep filter` did not write; use an "
                         "empty folder")
    _remove_output(output)  # a filter's output from before resuming existed: redone whole (options unknown)


def _remove_output(output: Path) -> None:
    """What a filter wrote into `output` (not the .unfiltered folder beside it)."""
    for path in [*output.glob("*.tar"), *output.glob(f"*{STATS_SUFFIX}"), *output.glob("*.idx.json")]:
        path.unlink()
    shutil.rmtree(output / SCORED_DIR, ignore_errors=True)
    (output / "manifest.json").unlink(missing_ok=True)
    (output / JOB_FILE).unlink(missing_ok=True)


def _claim(output: Path, input_spec: str, shards: list[_InputShard], options: CurationOptions,
           scoring_model: dict, replace_other_filter: bool) -> None:
    """Resume only the same job: inputs, what decides (data_prep/job.py's _job.json, refused as image-text
    refuses a changed job), and the model's weights (a run directory resolves to its newest checkpoint)."""
    identity = {"job": "filter", "input": input_spec,
                "shards": [[item.name, item.shard.num_samples] for item in shards],
                **{k: v for k, v in dataclasses.asdict(options).items() if k not in _SCHEDULING_OPTIONS},
                "scoring_model": {k: v for k, v in scoring_model.items() if k != "device"}}
    output.mkdir(parents=True, exist_ok=True)
    try:
        if claim_output(output, identity):
            return
    except ValueError:
        previous = json.loads((output / JOB_FILE).read_text(encoding="utf-8"))
        if not (replace_other_filter and previous.get("job") == "filter"):
            raise
        _remove_output(output)
    write_identity(output, identity)


def _read_sample(samples: TarSamples, shard: Shard, position: int) -> dict:
    raw = samples.read(shard.path, position)
    return {k: v for k, v in raw.items() if not k.startswith("__")} | {"__key__": raw["__key__"]}


def _caption(files: dict) -> str | None:
    text = files.get("txt")
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else None


def _image(files: dict) -> bytes:
    return next((files[e] for e in IMAGE_EXTENSIONS if e in files), b"")


def _pairs(number: int, item: _InputShard, samples: TarSamples) -> Iterator[tuple[_Row, tuple[bytes, str | None]]]:
    for position in range(item.shard.num_samples):
        files = _read_sample(samples, item.shard, position)
        row = _Row(number, position, files["__key__"])
        item.rows.append(row)
        yield row, (_image(files), _caption(files))


def _batched(pairs: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tagged_batches(todo: list[tuple[int, _InputShard]], samples: TarSamples,
                    size: int) -> Iterator[tuple[_InputShard, list, bool]]:
    """(shard, batch, whether it is the shard's last) for every unfinished shard, each batch read only when
    asked for."""
    for number, item in todo:
        last = -(-item.shard.num_samples // size) - 1
        for index, batch in enumerate(_batched(_pairs(number, item, samples), size)):
            yield item, batch, index == last


def _score_all(shards: list[_InputShard], samples: TarSamples, pool, options: CurationOptions,
               scored_dir: Path) -> int:
    """Pass 1: every sample's pHash and score (or its problem) onto its _Row, read back from `scored_dir` (see
    SCORED_DIR) for every shard, so that a resumed run decides on exactly the numbers an uninterrupted one
    does. Shards without such a file are scored first, each written there once its last batch is in; a
    batch never spans two shards, so a shard's scores do not depend on which shards an earlier attempt
    finished. Images are read as the scorers take batches (the pool's window ahead at most), so memory does
    not grow with the corpus. Returns the number of shards scored now."""
    todo = [(number, item) for number, item in enumerate(shards)
            if _scored_rows(scored_dir, number, item) is None]
    scored_dir.mkdir(exist_ok=True)
    in_flight: collections.deque = collections.deque()  # (shard, batch, last of its shard), oldest first

    def images() -> Iterator[list]:
        for tagged in _tagged_batches(todo, samples, options.batch_size):
            in_flight.append(tagged)
            yield [pair for _, pair in tagged[1]]

    with _bar(sum(item.shard.num_samples for _, item in todo), options.show_progress, "scored") as bar:
        for scored in pool.map("process", images()):
            item, batch, last = in_flight.popleft()
            for (row, _), outcome in zip(batch, scored):
                row.phash, row.clip_score = outcome.phash, outcome.clip_score
                if outcome.problem:
                    row.status, row.detail = outcome.problem, "while scoring"
            if last:
                _write_scored(scored_dir, item)
            bar(len(batch))
    for number, item in enumerate(shards):
        item.rows = _scored_rows(scored_dir, number, item) or []
    return len(todo)


def _scored_path(scored_dir: Path, item: _InputShard) -> Path:
    return scored_dir / (item.name[: -len(".tar")] + STATS_SUFFIX)


def _write_scored(scored_dir: Path, item: _InputShard) -> None:
    statuses = [{"source": item.shard.path, "source_row": row.position, "key": row.key, "status": row.status,
                 "detail": row.detail, "clip_score": row.clip_score, "phash": row.phash} for row in item.rows]
    write_stats(_scored_path(scored_dir, item), statuses, ShardRecord(item.name, item.shard.num_samples, 0, ""))


def _scored_rows(scored_dir: Path, number: int, item: _InputShard) -> list[_Row] | None:
    """The rows of a shard an earlier attempt (or this one) scored; None when it still needs scoring."""
    path = _scored_path(scored_dir, item)
    if not path.is_file():
        return None
    record, table = read_stats(path)
    if record.num_samples != item.shard.num_samples or table.num_rows != item.shard.num_samples:
        return None  # not this input shard's scores (the job identity pins the shards' sizes)
    columns = ("source_row", "key", "phash", "clip_score", "status", "detail")
    return [_Row(number, *(row[c] for c in columns)) for row in table.select(list(columns)).to_pylist()]


def _eval_index(options: CurationOptions, pool) -> EvalIndex | None:
    """Crop-variant pHashes of every image of the --decontaminate sets, read as `launch eval` reads them."""
    if not options.decontaminate:
        return None
    keys: list[str] = []
    samples = TarSamples()

    def images() -> Iterator[bytes]:  # read as the curators take batches: only their window in memory
        for folder in options.decontaminate:
            split = Path(folder) / "test"
            for shard in resolve_shards(str(split if any(split.glob("*.tar")) else folder)):
                for position in range(shard.num_samples):
                    files = _read_sample(samples, shard, position)
                    keys.append(f"{Path(folder).name}/{shard.path.rsplit('/', 1)[-1]}/{files['__key__']}")
                    yield _image(files)

    hashed = [h for batch in pool.map("eval_hashes", _batched(images(), 64)) for h in batch]
    usable = [(k, h) for k, h in zip(keys, hashed) if h is not None]
    return EvalIndex.build([k for k, _ in usable], [h for _, h in usable], options.decontaminate_max_bits)


def _decide(shards: list[_InputShard], index: EvalIndex | None, options: CurationOptions) -> float | None:
    """Statuses in the order of the module docstring; returns the CLIP score cut (None without scoring)."""
    rows = [row for item in shards for row in item.rows]
    if index is not None:
        hashed = [row for row in rows if row.status == OK and row.phash is not None]
        for row, match in zip(hashed, index.match([row.phash for row in hashed])):
            if match is not None:
                row.status, row.detail = EVAL_NEAR_DUPLICATE, f"{match[0]} (pHash {match[1]} bits apart)"
    cut = None
    if options.checkpoint is not None:
        candidates = [row for row in rows if row.status == OK]
        if options.keep_fraction is not None:
            ranked = sorted(candidates, key=lambda r: -r.clip_score)  # stable: ties keep input order
            num_kept = int(math.floor(len(ranked) * options.keep_fraction + 0.5))
            cut = ranked[num_kept - 1].clip_score if num_kept else None
            dropped = ranked[num_kept:]
        else:
            cut = options.min_clip_score
            dropped = [row for row in candidates if row.clip_score < cut]
        for row in dropped:
            row.status, row.detail = CLIP_SCORE_BELOW, f"{row.clip_score:.4f} < {cut if cut is None else round(cut, 4)}"
    if options.near_dedup:
        hashed = [row for row in rows if row.status == OK and row.phash is not None]
        for row, match in zip(hashed, near_duplicates([row.phash for row in hashed], options.near_dedup_max_bits)):
            if match is not None:
                earlier = hashed[match[0]]
                row.status = NEAR_DUPLICATE
                row.detail = f"{shards[earlier.shard].name}/{earlier.key} (pHash {match[1]} bits apart)"
    return cut


def _upstream_stats(input_spec: str, upstream: dict | None, shards: list[_InputShard]) -> dict[str, list[dict]]:
    """Stats file name -> rows, for a local data-prep input folder listing all its stats files; else {}."""
    if not upstream or not upstream.get("stats_files") or not Path(input_spec).is_dir():
        return {}
    found = {}
    for name in upstream["stats_files"]:
        path = Path(input_spec) / name
        if not path.is_file():
            return {}
        found[name] = pq.read_table(path).to_pylist()
    return found


def _counted_outside_stats(upstream: dict | None, upstream_stats: dict[str, list[dict]]) -> dict[str, int]:
    """Rows the upstream job rejected without a stats row (unreadable lines, rows dropped while listing)."""
    if not upstream_stats:
        return {}
    in_stats: dict[str, int] = {}
    for rows in upstream_stats.values():
        for status in rows:
            in_stats[status["status"]] = in_stats.get(status["status"], 0) + 1
    return {reason: count - in_stats.get(reason, 0) for reason, count in upstream.get("rejected", {}).items()
            if count > in_stats.get(reason, 0)}


def _write_outputs(shards: list[_InputShard], samples: TarSamples, output: Path,
                   upstream: dict[str, list[dict]]) -> tuple[list[ShardRecord], dict[str, int], int]:
    """Pass 2: kept samples copied into shards of the input's names, a stats file per input stats file (or per
    shard); returns the shard records, the rejected counts and the number of rows accounted for."""
    records: list[ShardRecord] = []
    by_stats = {item.name[: -len(".tar")] + STATS_SUFFIX: item for item in shards}
    rejected: dict[str, int] = {}
    num_rows = 0
    for stats_name in sorted(set(by_stats) | set(upstream)):  # zero-padded names: input order
        if (output / stats_name).is_file():  # written after its tar by an earlier attempt: done (as image-text)
            record, table = read_stats(output / stats_name)
            statuses = table.select(["status"]).to_pylist()
        else:
            record, statuses = _write_partition(output, stats_name, by_stats.get(stats_name), samples,
                                                upstream.get(stats_name), num_rows)
        if record.num_samples:
            records.append(record)
        for status in statuses:
            if status["status"] != OK:
                rejected[status["status"]] = rejected.get(status["status"], 0) + 1
        num_rows += len(statuses)
    return records, rejected, num_rows


def _write_partition(output: Path, stats_name: str, item: _InputShard | None, samples: TarSamples,
                     upstream_rows: list[dict] | None, first_row: int) -> tuple[ShardRecord, list[dict]]:
    """One output partition: the kept samples' tar, then (marking it done) its stats file."""
    kept = [row for row in item.rows if row.status == OK] if item else []
    record = ShardRecord(item.name if item else stats_name.replace(STATS_SUFFIX, ".tar"), 0, 0, "")
    if kept:
        record = write_shard(output / item.name, (_sample(samples, item.shard, row) for row in kept))
    statuses = _statuses(item, upstream_rows, first_row)
    write_stats(output / stats_name, statuses, record)
    return record, statuses


def _sample(samples: TarSamples, shard: Shard, row: _Row) -> Sample:
    files = _read_sample(samples, shard, row.position)
    assert files.pop("__key__") == row.key
    return Sample(row.key, files)


def _statuses(item: _InputShard | None, upstream_rows: list[dict] | None, first_row: int) -> list[dict]:
    """The stats rows of one output shard: the upstream rows with our decisions, or one row per sample."""
    ours = {row.key: row for row in item.rows} if item else {}
    if upstream_rows is None:
        return [{"row": first_row + i, "source": item.shard.path, "source_row": row.position, "key": row.key,
                 "status": row.status, "detail": row.detail, "clip_score": row.clip_score, "phash": row.phash}
                for i, row in enumerate(item.rows)]
    statuses = []
    for status in upstream_rows:
        row = ours.get(status["key"]) if status["status"] == OK else None
        if row is not None:
            status = {**status, "status": row.status, "detail": row.detail, "clip_score": row.clip_score,
                      "phash": row.phash}
        statuses.append(status)
    return statuses


class _bar:
    """tqdm over samples; silent when disabled."""

    def __init__(self, total: int, enabled: bool, what: str) -> None:
        self._tqdm = None
        if enabled and total:
            import sys

            from tqdm import tqdm

            self._tqdm = tqdm(total=total, unit="sample", desc=what, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self):
        return lambda n: self._tqdm.update(n) if self._tqdm is not None else None

    def __exit__(self, *exc: object) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def curated_image_text(request, options: CurationOptions) -> JobReport:
    """`image-text` with curation flags: the job writes OUTPUT/.unfiltered (resumable as ever; kept so another
    threshold needs no second download), then it is filtered into OUTPUT. Rows rejected while downloading
    and rows filtered out are counted together in OUTPUT's manifest. The filter resumes as `data-prep
    filter` does; other curation flags, or shards that --retry-failed changed, filter OUTPUT anew (it is
    derived from .unfiltered, which a refusal's "delete this folder" would throw away)."""
    from data_prep.image_text import run_image_text

    staging = Path(request.output) / UNFILTERED
    first = run_image_text(dataclasses.replace(request, output=staging))
    report = run_filter(str(staging), Path(request.output), options, replace_other_filter=True)
    report.seconds += first.seconds
    if request.job.write_report:
        from data_prep.report import write_report

        write_report(request.output)
    return report


UNFILTERED = ".unfiltered"
