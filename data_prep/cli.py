"""data-prep: turn image corpora (caption tables, labelled trees) into webdataset tar shards with
a manifest, sizes.json (open_clip) and _info.json (timm). See `data-prep COMMAND --help`."""
# Dispatch as in launch/cli.py: each subcommand's parser sets `func`, the function that runs it (here a
# _run_* function that imports its module when called, so --help stays fast); main() calls args.func(args)
# and prints a user mistake (ValueError) as one line, exit 2.
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from data_prep import __version__
from data_prep.curation_options import CurationOptions, checked_eval_dirs
from data_prep.fetch import FetchOptions
from data_prep.images import RESAMPLE_FILTERS, RESIZE_MODES, ImageOptions
from data_prep.opt_out import DEFAULT_DISALLOWED_DIRECTIVES, parse_directive_list
from pipeline.import_guard import hidden_modules
from pipeline.process_exit import exit_without_teardown


def _add_image_args(parser: argparse.ArgumentParser, default_size: int = 256) -> None:
    group = parser.add_argument_group("images")
    group.add_argument("--image-size", type=int, default=default_size, help="pixels (default %(default)s)")
    group.add_argument("--resize-mode", choices=RESIZE_MODES, default="shorter",
                       help="shorter side to --image-size, a centred square, or keep (default %(default)s)")
    group.add_argument("--resample", choices=tuple(RESAMPLE_FILTERS), default="area",
                       help="resize filter; area (default, as img2dataset) averages the pixels under "
                            "each output pixel when shrinking and is bicubic when enlarging")
    group.add_argument("--resize-only-if-bigger", action="store_true",
                       help="leave images whose shorter side is at most --image-size as they are: not "
                            "resized or cropped, original bytes kept where possible (upright RGB JPEG, "
                            "PNG or WebP), as img2dataset's option of this name")
    group.add_argument("--jpeg-quality", type=int, default=95)
    group.add_argument("--min-image-size", type=int, default=0,
                       help="reject images whose shorter side is below this (pixels)")


def _add_job_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("job")
    group.add_argument("--shard-size", type=int, default=1000, help="input rows per shard")
    group.add_argument("--workers", type=int, default=1,
                       help="partitions in parallel: worker processes, or Ray tasks (see --executor)")
    group.add_argument("--address", default=None,
                       help="Ray cluster address: partitions run as its tasks (default: $RAY_ADDRESS)")
    group.add_argument("--executor", choices=("auto", "local", "ray"), default="auto",
                       help="local: this process, or a process pool for --workers above 1; ray: Ray tasks "
                            "(on --address, $RAY_ADDRESS or an embedded Ray); auto (default): ray when a "
                            "cluster is named, else local. Same shards either way")
    group.add_argument("--threads", type=int, default=16, help="concurrent rows per partition")
    group.add_argument("--dedup", action="store_true", help="drop repeated images (same sha256)")
    group.add_argument("--retry-failed", action="store_true",
                       help="re-process only the rows that failed in an earlier run")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--no-report", action="store_true",
                       help="skip OUTPUT/stats/ (the report `data-prep stats` writes) at the end of the job")


def _add_shuffle_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--shuffle-seed", type=int, default=0,
                       help="rows are shuffled with this seed (within each input) before sharding, so "
                            "shards mix classes and sources (default %(default)s)")
    group.add_argument("--no-shuffle", action="store_true", help="keep the input order in the shards")


def _add_fetch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("downloads (--url-col)")
    group.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt")
    group.add_argument("--retries", type=int, default=2, help="extra attempts on transient errors")
    group.add_argument("--max-image-bytes", type=int, default=50 * 1024 * 1024)
    group.add_argument("--user-agent", default=FetchOptions.user_agent,
                       help="also names us in X-Robots-Tag: its product token (before the '/') is obeyed "
                            "besides data-prep and img2dataset")
    group.add_argument("--disallowed-header-directives", default=",".join(DEFAULT_DISALLOWED_DIRECTIVES),
                       help="X-Robots-Tag directives (for every robot, or for us) that drop an image as "
                            "opt_out (default %(default)s; '' obeys none)")


def _add_caption_table_args(parser: argparse.ArgumentParser) -> None:
    """Caption tables in, shards out: what image-text and retrieval sets share."""
    parser.add_argument("--input", action="append", required=True, help="table or glob (repeatable)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--caption-col", required=True)
    _add_image_source(parser)
    for add in (_add_image_args, _add_job_args, _add_fetch_args):
        add(parser)


def _add_image_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url-col", help="column of image URLs")
    source.add_argument("--path-col", help="column of image paths, relative to the table's folder")
    source.add_argument("--bytes-col", help="column of encoded image bytes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data-prep", description=__doc__)
    parser.add_argument("--version", action="version", version=f"data-prep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    it = sub.add_parser("image-text", help="caption tables (parquet/CSV/TSV/JSONL) to image-text shards")
    _add_caption_table_args(it)
    it.add_argument("--key-col", help="column of unique sample keys (default: shard + row number)")
    _add_shuffle_args(it)
    _add_curation_args(it, "--filter-checkpoint")
    it.set_defaults(func=_run_image_text)

    flt = sub.add_parser("filter", help="filter shards by CLIP score, against eval sets, near-duplicates")
    flt.add_argument("--input", required=True, help="shard folder, glob or brace list")
    flt.add_argument("--output", type=Path, required=True)
    _add_curation_args(flt, "--checkpoint")
    flt.add_argument("--workers", type=int, default=1, help="scoring actors; above 1 they run on Ray")
    flt.add_argument("--address", default=None, help="Ray cluster address (default: embedded Ray)")
    flt.add_argument("--no-progress", action="store_true", help="no progress bar")
    flt.add_argument("--no-report", action="store_true", help="skip OUTPUT/stats/ (what `data-prep stats` writes)")
    flt.set_defaults(func=_run_filter)

    lab = sub.add_parser("labelled", help="ImageFolder tree or path/label table to labelled shards")
    _add_labelled_args(lab)
    lab.add_argument("--val-fraction", type=float, default=0.0, help="held-out share written to val/: exactly round(N x F) of the N rows, "
                          "chosen by a seeded hash of each path (independent of row order)")
    lab.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    _add_shuffle_args(lab)
    lab.set_defaults(func=_run_labelled)

    ev = sub.add_parser("eval-set", help="zero-shot or retrieval evaluation sets (CLIP_benchmark layout)")
    kinds = ev.add_subparsers(dest="eval_kind", required=True, metavar="KIND")
    zs = kinds.add_parser("zeroshot", help="classification set: test/*.tar + classnames + templates")
    _add_labelled_args(zs)
    zs.add_argument("--templates", type=Path, help="file of prompt templates with {c}, one per line")
    zs.set_defaults(func=_run_zeroshot)
    rt = kinds.add_parser("retrieval", help="image-text retrieval set, several captions per image")
    _add_caption_table_args(rt)
    rt.add_argument("--image-id-col", help="rows sharing this value are one image (default: the image column)")
    rt.set_defaults(func=_run_retrieval)

    sample = sub.add_parser("sample", help="write a small real offline sample corpus")
    names = sample.add_subparsers(dest="sample_kind", required=True, metavar="NAME")
    digits = names.add_parser("digits", help="scikit-learn digits: labelled, image-text, zero-shot")
    digits.add_argument("--output", type=Path, required=True, help="corpus root folder")
    digits.add_argument("--image-size", type=int, default=32, help="side in pixels (default 32)")
    digits.add_argument("--val-fraction", type=float, default=0.2)
    digits.add_argument("--seed", type=int, default=0)
    digits.set_defaults(func=_run_sample_digits)

    ver = sub.add_parser("verify", help="re-read every shard and check it against the manifest")
    ver.add_argument("dir", type=Path, help="a dataset folder, or a folder holding several")
    ver.set_defaults(func=_run_verify)

    st = sub.add_parser("stats", help="report what a dataset holds (DIR/stats/report.md, .html, PNG plots)")
    st.add_argument("dir", help="a dataset folder, or a folder holding several (local or s3://, gs://)")
    st.set_defaults(func=_run_stats)
    return parser


def _add_labelled_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="ImageFolder root, or a table (with the columns below)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--path-col", help="table column of image paths (relative to the table)")
    parser.add_argument("--label-col", help="table column of class names or integer labels")
    parser.add_argument("--classnames", type=Path, help="file of class names in label order, one per line")
    _add_image_args(parser)
    _add_job_args(parser)


def _image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(args.image_size, args.resize_mode, args.jpeg_quality, args.min_image_size,
                        args.resample, args.resize_only_if_bigger)


def _job_options(args: argparse.Namespace):  # -> JobOptions (imported lazily: keeps --help fast)
    from data_prep.job import JobOptions

    shuffle_seed = None if getattr(args, "no_shuffle", True) else args.shuffle_seed
    return JobOptions(args.shard_size, args.workers, args.address, args.threads, args.dedup,
                      args.retry_failed, not args.no_progress, shuffle_seed,
                      publish=getattr(args, "bucket_output", None),
                      write_report=not getattr(args, "no_report", False), executor=args.executor)


def _image_text_request(args: argparse.Namespace):
    from data_prep.image_text import ImageTextRequest

    source, column = next((s, getattr(args, f"{s}_col")) for s in ("url", "path", "bytes")
                          if getattr(args, f"{s}_col"))
    fetch = FetchOptions(args.timeout, args.retries, max_bytes=args.max_image_bytes,
                         user_agent=args.user_agent,
                         disallowed_header_directives=parse_directive_list(args.disallowed_header_directives))
    return ImageTextRequest(tuple(args.input), args.output, args.caption_col, column, source,
                            getattr(args, "key_col", None), _image_options(args), fetch,
                            _job_options(args))


def _run_image_text(args: argparse.Namespace) -> int:
    from data_prep.image_text import run_image_text

    curation = _curation_options(args, args.filter_checkpoint)  # checked before any download
    if curation.active:
        from data_prep.filter import curated_image_text  # its imports (~20 ms) only when curating

        return _summarise(args.output, curated_image_text(_image_text_request(args), curation))
    return _summarise(args.output, run_image_text(_image_text_request(args)))


def _add_curation_args(parser: argparse.ArgumentParser, checkpoint_flag: str) -> None:
    """data_prep/filter.py: CLIP score, decontamination and near-duplicate options (filter and image-text)."""
    from data_prep.near_dup import EVAL_MAX_BITS, NEAR_DUP_MAX_BITS

    group = parser.add_argument_group("curation (data_prep/filter.py)")
    group.add_argument(checkpoint_flag, default=None, metavar="REF",
                       help="score every pair with this checkpoint (any REF `launch eval` takes)")
    group.add_argument("--model", dest="filter_model", default=None,
                       help="architecture of a weights file that does not name it (as `launch eval --model`)")
    cut = group.add_mutually_exclusive_group()
    cut.add_argument("--min-clip-score", type=float, help="keep pairs scoring at least this (cosine)")
    cut.add_argument("--keep-fraction", type=float, help="keep the best-scoring fraction (DataComp: 0.3)")
    group.add_argument("--batch-size", type=int, default=256, help="pairs per scoring batch")
    group.add_argument("--decontaminate", nargs="+", metavar="EVAL_DIR", default=[],
                       help="drop images that are near-copies of these evaluation sets' images")
    group.add_argument("--decontaminate-max-bits", type=int, default=EVAL_MAX_BITS,
                       help="pHash distance (of 64 bits) that counts as a copy (default %(default)s)")
    group.add_argument("--near-dedup", action="store_true", help="drop near-duplicate images (pHash)")
    group.add_argument("--near-dedup-max-bits", type=int, default=NEAR_DUP_MAX_BITS, help="(default %(default)s)")


def _curation_options(args: argparse.Namespace, checkpoint: str | None) -> CurationOptions:
    return CurationOptions(checkpoint, args.filter_model, args.min_clip_score, args.keep_fraction,
                           checked_eval_dirs(args.decontaminate), args.decontaminate_max_bits, args.near_dedup,
                           args.near_dedup_max_bits, args.batch_size, args.workers, args.address,
                           not args.no_progress)


def _run_filter(args: argparse.Namespace) -> int:
    from data_prep.filter import run_filter

    report = run_filter(args.input, args.output, _curation_options(args, args.checkpoint))
    if not args.no_report:
        from data_prep.report import write_report

        write_report(args.output)
    return _summarise(args.output, report)


def _run_retrieval(args: argparse.Namespace) -> int:
    from data_prep.image_text import run_retrieval_set

    return _summarise(args.output / "test", run_retrieval_set(_image_text_request(args), args.image_id_col))


def _labelled_request(args: argparse.Namespace):
    from data_prep.labelled import LabelledRequest

    classnames = tuple(_read_lines(args.classnames)) if args.classnames else None
    return LabelledRequest(args.input, args.output, args.path_col, args.label_col, classnames,
                           getattr(args, "val_fraction", 0.0), getattr(args, "seed", 0),
                           _image_options(args), _job_options(args))


def _run_labelled(args: argparse.Namespace) -> int:
    from data_prep.labelled import run_labelled

    reports = run_labelled(_labelled_request(args))
    for split, report in reports.items():
        folder = args.output / split if len(reports) > 1 else args.output
        _summarise(folder, report)
    return 0


def _run_zeroshot(args: argparse.Namespace) -> int:
    from data_prep.labelled import run_zeroshot_set

    templates = _read_lines(args.templates) if args.templates else None
    return _summarise(args.output / "test", run_zeroshot_set(_labelled_request(args), templates))


def _run_sample_digits(args: argparse.Namespace) -> int:
    from data_prep.samples.digits import write_digits_corpus

    root = write_digits_corpus(args.output, image_size_px=args.image_size,
                               val_fraction=args.val_fraction, seed=args.seed)
    print(f"digits corpus ready at {root}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from data_prep.verify import find_datasets, verify_dataset

    failed = 0
    for folder in find_datasets(args.dir):
        problems = verify_dataset(folder)
        for line in problems:
            print(f"MISMATCH {line}", file=sys.stderr)
        failed += bool(problems)
        print(f"{'FAILED' if problems else 'ok'}  {folder}")
    if failed:
        print(f"data-prep verify: {failed} dataset(s) do not match their manifest", file=sys.stderr)
    return 1 if failed else 0


def _run_stats(args: argparse.Namespace) -> int:
    from data_prep.report import write_bucket_reports, write_report
    from data_prep.verify import find_datasets
    from pipeline import storage

    if storage.is_remote(args.dir):
        storage.check_reachable(args.dir, "DIR", writable=True)  # StorageError: one line
        for report in write_bucket_reports(args.dir):
            print(f"report at {report}")
        return 0
    for folder in find_datasets(Path(args.dir)):
        print(f"{folder}: report at {write_report(folder)}")
    return 0


def _read_lines(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    return [line for line in lines if line]


def _summarise(folder: Path, report) -> int:
    """One line of totals and one of rejections per reason: every row is accounted for."""
    m = report.manifest
    rate = m["num_samples"] / report.seconds if report.seconds > 0 else 0.0
    print(f"{folder}: {m['num_samples']} samples in {len(m['shards'])} shards from "
          f"{m['num_input_rows']} rows ({report.num_partitions_run} partitions run, "
          f"{report.seconds:.1f} s, {rate:.1f} samples/s)")
    if m["rejected"]:
        reasons = ", ".join(f"{reason}={count}" for reason, count in m["rejected"].items())
        print(f"{folder}: rejected {sum(m['rejected'].values())}: {reasons}")
    return 0


def check_output_folder(output: Path | str) -> None:
    """Stop before any work when --output cannot become a folder we write into: it is a file, it
    lies under a file, or its nearest existing folder refuses a new file. Bucket URLs are checked
    by their writer."""
    if "://" in str(output) or str(output).startswith("s3:/"):
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {path}: is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output {path}: {existing} is a file, so no folder can be made under it")
    try:  # a real probe: access() says yes to root, and /proc refuses files whatever its mode
        with tempfile.TemporaryFile(dir=existing, prefix=".data-prep-probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"--output {path}: {existing} is not writable ({exc.strerror})") from None


def _stage_bucket_output(args: argparse.Namespace):
    """--output s3://...: check the bucket takes writes, then point --output at its staging folder
    (data_prep/bucket.py); None for a local --output."""
    raw = getattr(args, "output", None)
    if raw is None or args.func is _run_sample_digits:
        return None
    # argparse made a Path of it, which folds 's3://' into 's3:/'.
    url = str(raw).replace(":/", "://", 1) if ":/" in str(raw) and "://" not in str(raw) else str(raw)
    from pipeline import storage

    if not storage.is_remote(url):
        return None
    from data_prep.bucket import BucketOutput

    storage.check_reachable(url, "--output", writable=True)  # StorageError: one line
    bucket = BucketOutput.for_url(url)
    bucket.pull(with_tars=bool(getattr(args, "retry_failed", False)))
    args.output, args.bucket_output = Path(bucket.staging), bucket
    return bucket


def _pyarrow_without_pandas() -> None:
    """pyarrow imports pandas on its first array built from Python objects (reading a table, a stats
    file), only to ask whether those objects are pandas'; data-prep's never are, and the import costs
    ~0.3 CPU-s before any work (5% of a 2,000-row job, benchmarks/RESULTS.md issue 16). pyarrow asks once
    per process and remembers the answer (forked workers inherit it); pandas itself stays importable, and
    Table.to_pandas still works. For the command only: a caller's process may hand pyarrow pandas objects."""
    with hidden_modules("pandas"):  # nothing changes where pandas is already imported
        import pyarrow as pa

        pa.array([0])  # the first such array: pyarrow looks for pandas here


def main(argv: Sequence[str] | None = None) -> int:
    code = _run(argv)
    if argv is None:  # the command line, not a caller in its own process
        exit_without_teardown(code)
    return code


def _run(argv: Sequence[str] | None) -> int:
    # Before anything imports Ray: an embedded single-machine Ray stays on 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = build_parser().parse_args(argv)
    if argv is None:  # the command line, not a caller in its own process; after --help has exited
        _pyarrow_without_pandas()
    try:
        bucket = _stage_bucket_output(args)
        if getattr(args, "output", None) is not None:
            check_output_folder(args.output)
        code = int(args.func(args))
        if bucket is not None:
            bucket.push_rest()  # metadata, every manifest.json last
            print(f"uploaded to {bucket.url}")
        return code
    except ValueError as exc:
        # User mistakes (bad paths, wrong columns, unreadable tables) end in one clear line.
        print(f"data-prep: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The disk or a folder failed us mid-job (full, removed, permissions changed): one line.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"data-prep: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Finished shards are complete on disk (tar and stats renamed into place); the job file
        # makes the same command skip them. A second Ctrl-C while we exit is ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("data-prep: interrupted; finished shards are kept: run the same command again to "
              "resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
