"""`data-prep labelled` (ImageFolder trees or path/label tables, optional train/val split) and the
zero-shot half of `data-prep eval-set` (CLIP_benchmark's webdataset layout)."""
from __future__ import annotations

import glob
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from data_prep.images import ImageOptions
from data_prep.image_text import load_sources
from data_prep.job import JobOptions, JobReport, SourceTable, run_job
from data_prep.manifest import write_parent_timm_info
from data_prep.rows import INTERNAL_COLS, SOURCE_ROW_COL, RowSpec
from data_prep.writer import write_bytes_atomic

# The prompts a zero-shot set is written with when --templates names none (a subset of OpenAI's CLIP ImageNet
# templates); `{c}` is the class.
ZEROSHOT_SET_TEMPLATES = (
    "a photo of a {c}.", "a bad photo of a {c}.", "a photo of many {c}.", "a close-up photo of a {c}.",
    "a bright photo of a {c}.", "a cropped photo of a {c}.", "a blurry photo of a {c}.",
    "a photo of the small {c}.", "a photo of the large {c}.", "art of the {c}.",
)


@dataclass(frozen=True)
class LabelledRequest:
    input: str
    """An ImageFolder root (class = sub-folder name) or a table / glob of tables."""
    output: Path
    path_col: str | None = None
    label_col: str | None = None
    classnames: tuple[str, ...] | None = None
    """Explicit class order (e.g. from --classnames FILE); default: sorted label values."""
    val_fraction: float = 0.0
    seed: int = 0
    image: ImageOptions = field(default_factory=ImageOptions)
    job: JobOptions = field(default_factory=JobOptions)


def load_labelled(request: LabelledRequest) -> tuple[list[SourceTable], tuple[str, ...], dict[str, int]]:
    """Sources with `path` and `label` columns, the class names, and rows rejected while listing."""
    if not glob.has_magic(request.input) and not Path(request.input).exists():
        raise ValueError(f"--input {request.input}: does not exist (expected an ImageFolder "
                         "folder, or a table with --path-col and --label-col)")
    if Path(request.input).is_dir():
        if request.path_col or request.label_col:
            raise ValueError("--path-col/--label-col apply to tables; "
                             f"{request.input} is a folder (an ImageFolder tree)")
        source, classnames, rejected = scan_image_folder(Path(request.input))
        return [source], request.classnames or classnames, rejected
    if not (request.path_col and request.label_col):
        raise ValueError(f"{request.input}: a table input needs --path-col and --label-col "
                         "(or pass an ImageFolder directory)")
    sources = load_sources([request.input], [request.path_col, request.label_col])
    sources = [SourceTable(s.source, s.base_dir, s.table.rename_columns(
        [_renamed(n, request) for n in s.table.column_names]), s.num_unreadable_rows) for s in sources]
    return sources, request.classnames or _classnames_from_labels(sources), {}


def _renamed(name: str, request: LabelledRequest) -> str:
    return {request.path_col: "path", request.label_col: "label"}.get(name, name)


def scan_image_folder(root: Path) -> tuple[SourceTable, tuple[str, ...], dict[str, int]]:
    """Every file under root/CLASS/ (recursively) is a row; files directly in root are counted."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE files)")
    paths, labels = [], []
    for class_dir in class_dirs:
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            paths.append(path.relative_to(root).as_posix())
            labels.append(class_dir.name)
    stray = sum(1 for p in root.iterdir() if p.is_file())
    if not paths:
        raise ValueError(f"{root}: no files in its class sub-folders "
                         f"({', '.join(d.name for d in class_dirs[:5])}); nothing to write")
    table = pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string())})
    rejected = {"outside_class_folder": stray} if stray else {}
    return SourceTable(str(root), str(root.resolve()), table), tuple(d.name for d in class_dirs), rejected


def _classnames_from_labels(sources: list[SourceTable]) -> tuple[str, ...]:
    values = {v for s in sources for v in s.table.column("label").to_pylist() if v is not None}
    if values and all(isinstance(v, int) for v in values):
        # Integer labels keep their meaning: class i is index i.
        return tuple(str(i) for i in range(max(values) + 1))
    return tuple(sorted(str(v).strip() for v in values if str(v).strip()))


def _split_hash(seed: int, path: object) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "big")


def split_train_val_sources(sources: Sequence[SourceTable], val_fraction: float,
                            seed: int) -> list[tuple[SourceTable, SourceTable]]:
    """Exactly round(n * val_fraction) of all n rows go to val: the rows whose hash of
    (seed, path) is smallest (ties by input and row). Independent of row order and stable across
    runs; adding files moves at most the few files at the boundary between the splits."""
    tables = [s.table.append_column(SOURCE_ROW_COL, pa.array(range(s.table.num_rows), pa.int64()))
              for s in sources]
    ranked = sorted((_split_hash(seed, p), i, r) for i, t in enumerate(tables)
                    for r, p in enumerate(t.column("path").to_pylist()))
    num_val = int(math.floor(len(ranked) * val_fraction + 0.5))
    chosen = [[False] * t.num_rows for t in tables]
    for _, i, r in ranked[:num_val]:
        chosen[i][r] = True
    pairs = []
    for source, table, flags in zip(sources, tables, chosen):
        mask = pa.array(flags, pa.bool_())
        train = SourceTable(source.source, source.base_dir, table.filter(pc.invert(mask)))
        # Unreadable lines belong to no split; count them once, with train.
        train.num_unreadable_rows = source.num_unreadable_rows
        pairs.append((train, SourceTable(source.source, source.base_dir, table.filter(mask))))
    return pairs


def split_train_val(source: SourceTable, val_fraction: float, seed: int) -> tuple[SourceTable, SourceTable]:
    """One source split as split_train_val_sources does."""
    return split_train_val_sources([source], val_fraction, seed)[0]


def run_labelled(request: LabelledRequest, kind: str = "labelled") -> dict[str, JobReport]:
    if not 0.0 <= request.val_fraction < 1.0:
        raise ValueError(f"--val-fraction {request.val_fraction}: expected 0 <= F < 1")
    sources, classnames, rejected = load_labelled(request)
    if not classnames:
        raise ValueError(f"{request.input}: no labels found")
    passthrough = tuple(dict.fromkeys(n for s in sources for n in s.table.column_names
                                      if n not in INTERNAL_COLS and n != "label"))
    spec = RowSpec(kind, "path", "path", label_col="label", classnames=tuple(classnames),
                   passthrough_cols=passthrough, image=request.image)
    info = {"inputs": [s.source for s in sources], "val_fraction": request.val_fraction,
            "seed": request.seed}
    if request.val_fraction == 0.0:
        out = request.output / "test" if kind == "zeroshot" else request.output
        split = "test" if kind == "zeroshot" else "train"
        return {split: run_job(spec, sources, out, request.job, dataset_name=request.output.name,
                               split=split, source_info=info, extra_rejected=rejected)}
    pairs = split_train_val_sources(sources, request.val_fraction, request.seed)
    reports = {}
    for index, split in enumerate(("train", "val")):
        reports[split] = run_job(spec, [p[index] for p in pairs], request.output / split, request.job,
                                 dataset_name=request.output.name, split=split,
                                 source_info={**info, "split": split},
                                 extra_rejected=rejected if split == "train" else None)
    write_parent_timm_info(request.output, request.output.name,
                           {s: r.manifest for s, r in reports.items()})
    return reports


def run_zeroshot_set(request: LabelledRequest, templates: Sequence[str] | None = None) -> JobReport:
    """A zero-shot classification set: test/*.tar (image + cls), classnames.txt and
    zeroshot_classification_templates.txt, plus the nshards.txt/dataset_type.txt CLIP_benchmark reads."""
    if request.val_fraction:
        raise ValueError("an eval set has one split (test); --val-fraction does not apply")
    lines = list(templates or ZEROSHOT_SET_TEMPLATES)
    if not all("{c}" in t for t in lines):
        raise ValueError("every zero-shot template needs a {c} placeholder for the class name")
    report = run_labelled(request, kind="zeroshot")["test"]
    out = request.output
    classnames = report.manifest["classnames"]
    write_bytes_atomic(out / "classnames.txt", ("\n".join(classnames) + "\n").encode("utf-8"))
    write_bytes_atomic(out / "zeroshot_classification_templates.txt",
                       ("\n".join(lines) + "\n").encode("utf-8"))
    write_bytes_atomic(out / "dataset_type.txt", b"classification\n")
    write_bytes_atomic(out / "test" / "nshards.txt", f"{len(report.manifest['shards'])}\n".encode())
    return report
