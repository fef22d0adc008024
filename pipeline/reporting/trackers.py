"""Experiment trackers (`run.trackers`): TensorBoard, Weights & Biases and MLflow fed by rank 0 with every
metrics.jsonl row, the resolved config as parameters, and at the end of a finished run its record (final
metrics, config.yaml, the `launch report` page and plots) as artifacts.

A tracker is a small class in TRACKER_CLASSES; `Trackers` fans out to the ones that started. A tracker that
cannot start (library missing, server unreachable, no credentials) is one warning line and the run goes on
without it; one that fails later is disabled with one warning line, never a crash mid-run. The tracked runs'
ids go to trackers.json in the run directory (the trainer writes it), so a resumed run continues them.
wandb and mlflow are imported only when configured: a plain run never loads them.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import ClassVar, Iterable
from urllib.parse import urlparse

TRACKERS_RECORD = "trackers.json"  # tracker name -> the tracked run's id
PROJECT = "resclip"  # W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say
OUTCOMES = ("finished", "preempted", "failed")
CONNECT_TIMEOUT_S = 5.0
_MLFLOW_REFUSED = re.compile(r"[^/\w.\- :]")  # what MLflow's key validation refuses (mlflow/utils/validation.py)
_WANDB_ARTIFACT_REFUSED = re.compile(r"[^\w.-]")


def warn(text: str) -> None:
    """One line on the console (launch/console.py passes `[pretrain` lines), whatever the error's text holds."""
    line = " ".join(text.split())
    print(f"[pretrain] warning: {line[:400]}", file=sys.stdout, flush=True)


def flat_params(config: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}: one parameter per config field, as trackers list them."""
    flat: dict = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row: nested counts flattened under their key (train/skipped_samples/<reason>);
    text, lists and booleans left out."""
    found: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            found.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[f"{prefix}{key}"] = value
    return found


def mlflow_key(key: str) -> str:
    """A metric or parameter name MLflow accepts: '/' is allowed, '@' (recall@5) and the like become '_'."""
    return _MLFLOW_REFUSED.sub("_", key)


class Tracker:
    """One tracking backend. start returns the tracked run's id (None: nothing to continue on resume)."""

    name: ClassVar[str] = ""
    stores_artifacts: ClassVar[bool] = True

    def start(self, run_dir: Path, run_name: str, params: dict, resume_id: str | None) -> str | None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_artifacts(self, run_dir: Path, paths: list[Path]) -> None:
        """Files of the run directory, kept under their relative folder (report/report.md ...)."""

    def close(self, outcome: str) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in RUN_DIR/tensorboard/, appended to on resume (mirrored with the run's files)."""

    name = "tensorboard"
    stores_artifacts = False

    def start(self, run_dir, run_name, params, resume_id):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        return None

    def log(self, step, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, outcome):
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run (WANDB_* variables; WANDB_MODE=offline writes it under WANDB_DIR, else RUN_DIR/wandb/)."""

    name = "wandb"

    def start(self, run_dir, run_name, params, resume_id):
        import wandb

        # console="off": launch/console.py owns stdout; W&B's own capture would wrap it a second time.
        options = {"project": os.environ.get("WANDB_PROJECT", PROJECT), "name": run_name,
                   "settings": wandb.Settings(console="off", silent=True)}
        if "WANDB_DIR" not in os.environ:
            options["dir"] = str(run_dir)
        if resume_id:
            options.update(id=resume_id, resume="allow")
        self.run = wandb.init(**options)
        self.run.config.update(params, allow_val_change=True)  # a relaunch may change a value
        # Rows are plotted against the trainer's step, not W&B's call counter: a resumed run repeats the steps
        # after its checkpoint and asynchronous evaluations log at earlier checkpoints' steps.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run_name = run_name
        return self.run.id

    def log(self, step, metrics):
        self.run.log({"step": step, **metrics})

    def log_artifacts(self, run_dir, paths):
        import wandb

        artifact = wandb.Artifact(_WANDB_ARTIFACT_REFUSED.sub("_", f"{self.run_name}-record"), type="run-record")
        for path in paths:
            artifact.add_file(str(path), name=path.relative_to(run_dir).as_posix())
        self.run.log_artifact(artifact)

    def close(self, outcome):
        self.run.finish(exit_code=1 if outcome == "failed" else 0)


class MlflowTracker(Tracker):
    """An MLflow run on the server MLFLOW_TRACKING_URI names (or an sqlite:/// or file: store)."""

    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}
    _PARAMS_PER_CALL, _METRICS_PER_CALL = 100, 1000  # MLflow's log_batch limits

    def start(self, run_dir, run_name, params, resume_id):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("MLFLOW_TRACKING_URI is not set (an mlflow server's http:// address, or sqlite:///FILE)")
        _check_reachable(uri)  # a closed port answers at once; MLflow's own retries would take minutes
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        wanted = {mlflow_key(key): "" if value is None else str(value) for key, value in params.items()}
        self.run_id = self._resume(resume_id, wanted) if resume_id else None
        if self.run_id is None:
            self.run_id = self.client.create_run(self._experiment_id(), run_name=run_name,
                                                 tags={"run_dir": str(run_dir)}).info.run_id
            self._log_params(wanted)
        return self.run_id

    def _experiment_id(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _resume(self, run_id: str, wanted: dict[str, str]) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            logged = self.client.get_run(run_id).data.params
        except MlflowException as err:
            warn(f"tracker mlflow: cannot continue run {run_id} ({err.message}); starting a new one")
            return None
        self.client.update_run(run_id, status="RUNNING")
        # Params are immutable in MLflow: new ones are added, a relaunch's changed values become tags.
        self._log_params({k: v for k, v in wanted.items() if k not in logged})
        for key, value in wanted.items():
            if key in logged and logged[key] != value:
                self.client.set_tag(run_id, key, value)
        return run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for first in range(0, len(items), self._PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[first:first + self._PARAMS_PER_CALL])

    def log(self, step, metrics):
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        items = [Metric(mlflow_key(key), float(value), now_ms, step) for key, value in metrics.items()]
        for first in range(0, len(items), self._METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=items[first:first + self._METRICS_PER_CALL])

    def log_artifacts(self, run_dir, paths):
        for path in paths:
            folder = path.parent.relative_to(run_dir).as_posix()
            self.client.log_artifact(self.run_id, str(path), artifact_path=None if folder == "." else folder)

    def close(self, outcome):
        self.client.set_terminated(self.run_id, status=self._STATUS[outcome])


def _check_reachable(uri: str) -> None:
    """ConnectionError when an http(s) tracking server does not accept a connection within CONNECT_TIMEOUT_S."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(f"cannot connect to {parsed.hostname}:{port} ({err})") from None


TRACKER_CLASSES: dict[str, type[Tracker]] = {
    cls.name: cls for cls in (TensorBoardTracker, WandbTracker, MlflowTracker)}


class Trackers:
    """The trackers that started, fed together; a failing one is disabled with one warning."""

    def __init__(self, run_dir: Path, started: dict[str, Tracker], ids: dict[str, str]):
        self.run_dir, self.started, self.ids = run_dir, started, ids

    @classmethod
    def start(cls, names: Iterable[str], run_dir: Path, run_name: str, params: dict,
              resume_ids: dict[str, str]) -> "Trackers":
        started: dict[str, Tracker] = {}
        ids: dict[str, str] = {}
        for name in names:
            if name not in TRACKER_CLASSES:
                raise ValueError(f"run.trackers: unknown tracker {name!r} (valid: {', '.join(TRACKER_CLASSES)})")
            tracker = TRACKER_CLASSES[name]()
            try:
                run_id = tracker.start(run_dir, run_name, params, resume_ids.get(name))
            except Exception as err:  # noqa: BLE001 - a tracker is never worth the run
                warn(f"tracker {name} unavailable: {type(err).__name__}: {err}")
                continue
            started[name] = tracker
            if run_id:
                ids[name] = run_id
        return cls(run_dir, started, ids)

    def _each(self, what: str, call) -> None:
        for name, tracker in list(self.started.items()):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001 - training goes on without this tracker
                del self.started[name]
                warn(f"tracker {name} disabled: {what} failed: {type(err).__name__}: {err}")

    def log(self, step: int, metrics: dict) -> None:
        numbers = scalars(metrics)
        if numbers:
            self._each(f"logging step {step}", lambda tracker: tracker.log(step, numbers))

    def log_run_record(self) -> None:
        """Final metrics, the resolved config and the report (written into RUN_DIR/report/ here) as artifacts."""
        if not any(tracker.stores_artifacts for tracker in self.started.values()):
            return
        paths = [self.run_dir / name for name in ("final_metrics.json", "config.yaml")
                 if (self.run_dir / name).is_file()]
        try:
            from pipeline.reporting import write_report

            report = write_report(self.run_dir)
            paths += [report.markdown, report.html, *(report.output_dir / plot.filename for plot in report.plots)]
        except Exception as err:  # noqa: BLE001 - the report is a convenience; the metrics are logged
            warn(f"trackers: no report for the artifacts: {type(err).__name__}: {err}")
        self._each("logging artifacts", lambda tracker: tracker.log_artifacts(self.run_dir, paths))

    def finish(self, outcome: str) -> None:
        """A finished run's record as artifacts, then every tracked run ends with the run's outcome."""
        assert outcome in OUTCOMES, outcome
        if outcome == "finished":
            self.log_run_record()
        self._each("closing", lambda tracker: tracker.close(outcome))
        self.started.clear()

    def record(self) -> str:
        """trackers.json: the ids a resumed run continues."""
        return json.dumps(self.ids, indent=1, sort_keys=True) + "\n"
