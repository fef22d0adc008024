"""Relaunching a run name: what a resume may change, checked in the driver before any worker starts.

A relaunch continues the latest complete checkpoint's step and data position. Under a config that changes
what a step computes, that would silently mix two runs in one directory; so the new config is compared with
the checkpoint's (meta.json "config"), key by key, and only RESUMABLE_KEYS may differ. An accepted change is
printed in one line, and the config that wrote the checkpoint is kept beside the new config.yaml.
`checkpoint.resume: false` starts the run over and compares nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.config import Config, ConfigError

# Keys a relaunch may change and still resume its run (README, "Run directory"): how long it trains, how often
# it logs, checkpoints and validates, where its metrics go (a tracker added mid-run starts at the resumed step),
# what it validates on and how (eval.async), and how the work is spread over processes and
# machines. Every other key changes what a step computes or which samples it sees (data.train, the model,
# the optimizer, the batch arithmetic, ray.num_workers, precision, seed), so resuming under it would continue
# the old run's step and data position with a new meaning: refused, naming the keys.
RESUMABLE_KEYS = frozenset({
    "run.output_dir", "run.log_every_steps", "run.inject_failure_at_step", "run.inject_failure_in_checkpoint",
    "run.profile_steps", "run.trackers", "schedule.epochs", "schedule.max_steps",
    "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.keep_every", "checkpoint.preempt_grace_s",
    "eval.every_steps", "eval.at_end", "eval.batch_size_per_rank", "eval.zeroshot", "eval.async",
    "eval.async_num_cpus", "eval.async_num_gpus",
    "data.val", "data.val_image_size_px", "data.val_crop_pct", "data.num_workers_per_rank",
    "ray.max_failures", "ray.cpus_per_worker", "ray.gpus_per_worker", "ray.torch_threads_per_worker",
    "ray.storage_path",
})
_ABSENT = "(absent)"


def resume_changes(cfg: Config) -> tuple[Path, dict, dict] | None:
    """(checkpoint, its meta, {key: (its value, this config's)}) for the checkpoint a launch of `cfg` resumes
    from; None when it starts from step 0."""
    from pipeline import checkpoint

    latest = checkpoint.find_latest_complete(cfg.run_dir) if cfg.checkpoint.resume else None
    if latest is None:
        return None
    meta = checkpoint.read_meta(latest)
    before, after = _flat(_normalized(meta.get("config") or {})), _flat(_normalized(cfg.to_dict()))
    changes = {key: (before.get(key, _ABSENT), after.get(key, _ABSENT)) for key in sorted(set(before) | set(after))
               if before.get(key, _ABSENT) != after.get(key, _ABSENT)}
    return latest, meta, changes


def check_resume(cfg: Config, source: str) -> None:
    """A relaunch resumes only what it would train itself: the checkpoint's config may differ in
    RESUMABLE_KEYS alone, and (classifiers) its class names must be the training manifest's."""
    found = resume_changes(cfg)
    if found is None:
        return
    latest, meta, changes = found
    refused = [key for key in changes if key not in RESUMABLE_KEYS]
    if refused:
        raise ConfigError("run.name", f"{cfg.run.name} would resume from {_shown(cfg, latest)}, written with "
                          f"another config: "
                          f"{_listed(changes, refused)}; these keys cannot change mid-run (README, 'Run "
                          "directory', lists those that can): use a new run.name, or checkpoint.resume: false "
                          "to start this run over", source)
    from pipeline import families

    if families.get(cfg.model.kind).data_kind == "labelled":  # trained on classes: checkpoints record their names
        _check_resumed_class_names(cfg, latest, meta, source)
    if changes:
        print(f"[launch] resuming {cfg.run_url} from {latest.name} with changed settings: "
              f"{_listed(changes, list(changes))} (its config is kept as {_archived_config(latest).name})",
              flush=True)


def _check_resumed_class_names(cfg: Config, latest: Path, meta: dict, source: str) -> None:
    from pipeline.class_names import CHECKPOINT_KEY, manifest_class_names

    recorded = meta.get(CHECKPOINT_KEY)
    try:
        current = manifest_class_names(cfg.data.train)
    except ValueError as err:
        raise ConfigError("data.train", str(err), source) from None
    if recorded and current and list(recorded) != current:
        recorded = list(recorded)
        at = next(i for i in range(max(len(current), len(recorded)))
                  if i >= min(len(current), len(recorded)) or current[i] != recorded[i])
        now, then = (names[at] if at < len(names) else _ABSENT for names in (current, recorded))
        raise ConfigError("data.train", f"its manifest's class names differ from those {_shown(cfg, latest)} was "
                          "trained on "
                          f"(output {at}: {now!r} now, {then!r} then): resuming would change what the model's "
                          "outputs mean; use a new run.name", source)


def _shown(cfg: Config, ckpt: Path) -> str:
    """A checkpoint as people know it: its URL for a run in a bucket (not the local staging copy)."""
    from pipeline.run_mirror import shown

    return shown(cfg, ckpt)


def _normalized(raw: dict) -> dict:
    """A config as plain JSON values with every default filled in, so a checkpoint written before a key was
    added compares equal on it; one the current code cannot read is compared as written."""
    try:
        raw = Config.from_dict(raw).to_dict()
    except ConfigError:
        pass
    return json.loads(json.dumps(raw, default=str))


def _flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, keys in config.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def _listed(changes: dict, keys: list[str]) -> str:
    def shown(value) -> str:
        text = value if value == _ABSENT else json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return ", ".join(f"{key} {shown(changes[key][0])} -> {shown(changes[key][1])}" for key in keys)


def _archived_config(ckpt_dir: Path) -> Path:
    """Where the config that wrote a checkpoint is kept when a relaunch changes resumable keys."""
    return ckpt_dir.parent.parent / f"config.{ckpt_dir.name}.yaml"


def keep_earlier_config(cfg: Config) -> None:
    """Before config.yaml is rewritten for a resume with changed (resumable) settings: keep it as the config of
    the checkpoint resumed from. Kept once: another relaunch from the same checkpoint leaves it alone."""
    found = resume_changes(cfg)
    current = cfg.run_dir / "config.yaml"
    if found is None or not found[2] or not current.is_file():
        return
    archived = _archived_config(found[0])
    if not archived.exists():
        os.replace(current, archived)
