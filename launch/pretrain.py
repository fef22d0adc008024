"""`launch pretrain`: validate, prepare, then run the per-worker loop on Ray (or in this process)."""
from __future__ import annotations

import argparse
import os
import sys

from launch.console import RUN_LOG, run_output
from launch.prepare import absolute_paths, ensure_sample_corpus, preflight, write_run_record
from pipeline import preemption, storage
from pipeline.config import Config, ConfigError, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("pretrain", help="train a model from a config (Ray + DeepSpeed)")
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local cluster)")
    parser.add_argument("--no-ray", action="store_true",
                        help="run the worker loop in this process (world size 1, or torchrun's environment)")
    parser.set_defaults(func=run)


def prepared_config(config_path: str, overrides: list[str]) -> Config:
    cfg = load_config(config_path, overrides)
    ensure_sample_corpus(cfg, config_path)
    cfg = absolute_paths(cfg)
    preflight(cfg, config_path)
    check_resume_checkpoint(cfg)
    return cfg


def check_resume_checkpoint(cfg: Config) -> None:
    """The checkpoint a relaunch will resume from, checked before any worker starts, so that a missing,
    truncated or code-carrying file is one line here (the workers load it weights-only whatever this finds)."""
    from pipeline import checkpoint

    latest = checkpoint.find_latest_complete(cfg.run_dir) if cfg.checkpoint.resume else None
    if latest is not None:
        checkpoint.verify_files(latest, checkpoint.read_meta(latest))


def run(args: argparse.Namespace) -> int:
    cfg = prepared_config(args.config, args.set)
    if args.no_ray and cfg.eval.async_:
        raise ConfigError("eval.async", "the evaluation actor needs Ray: drop --no-ray, or set eval.async false "
                                        "and run `launch eval --follow RUN_DIR` beside the run", args.config)
    run_dir = write_run_record(cfg, args.config)
    remote = storage.is_remote(cfg.run.output_dir)
    if remote:  # staged on this machine, durable in the bucket (pipeline/run_mirror.py)
        from pipeline import run_mirror

        run_mirror.upload_run_record(cfg)
        print(f"[launch] run dir {cfg.run_url} (staged in {run_dir})", flush=True)
    else:
        print(f"[launch] run dir {run_dir}", flush=True)
    preemption.clear(run_dir, cfg)
    if args.no_ray:
        from pipeline.trainer import run_worker

        with preemption.DriverHandler(run_dir, cfg.checkpoint.preempt_grace_s, preemption.request_url(cfg)), \
                run_output(run_dir / RUN_LOG):
            final = run_worker(cfg.to_dict())
    else:
        final = run_on_ray(cfg, args.address or os.environ.get("RAY_ADDRESS"))
        if final is None:
            return 1
    stopped = preemption.was_preempted(run_dir, cfg)
    if stopped:
        print(f"[launch] preempted at step {stopped['step']}: complete checkpoint {stopped['checkpoint']}; "
              f"run the same command again to resume at the next sample", flush=True)
        return preemption.EXIT_PREEMPTED
    print_summary(final, cfg.run_url if remote else run_dir)
    return 0


def run_on_ray(cfg: Config, address: str | None) -> dict | None:
    """Train on Ray: the final metrics, or None when training failed. The console shows our lines; everything
    Ray, DeepSpeed and the other libraries print goes to <run dir>/logs/output.log (launch/console.py)."""
    with run_output(cfg.run_dir / RUN_LOG) as log:
        return _run_on_ray(cfg, address, log)


def tracker_env() -> dict[str, str]:
    """The driver's WANDB_* and MLFLOW_* variables (pipeline/reporting/trackers.py reads them on rank 0)."""
    return {name: value for name, value in os.environ.items() if name.startswith(("WANDB_", "MLFLOW_"))}


def _run_on_ray(cfg: Config, address: str | None, log) -> dict | None:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.trainer import train_loop_per_worker

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            needed_cpus = int(cfg.ray.num_workers * cfg.ray.cpus_per_worker + async_eval_cpus(cfg) + 0.999)
            start_private_ray(num_cpus=max(os.cpu_count() or 1, needed_cpus))
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    check_cluster_fits(cfg, use_gpu, ray.cluster_resources())
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": cfg.ray.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name="ray_train",
            # Beside the run directory, in its bucket for a bucket run: a path local to the driver's machine
            # would not exist on the others when nothing is shared.
            storage_path=cfg.ray.storage_path or cfg.run_url,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            # Ray Train's INFO logs stay off the console (its per-report line escapes this: launch/console.py).
            logging_config=LoggingConfig(log_level="WARNING"),
            # Ray Train's print patch sends each print to its logger and stdout: lines appear twice. Workers on
            # other machines reach the driver's buckets with its endpoint and credentials (storage.credential_env),
            # and its W&B / MLflow servers and settings (run.trackers).
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **storage.credential_env(),
                                             **tracker_env()}},
        ),
    )
    try:
        with preemption.DriverHandler(cfg.run_dir, cfg.checkpoint.preempt_grace_s, preemption.request_url(cfg)):
            trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; its last line says what went wrong
        message = str(err).strip().splitlines()
        print(f"error: training failed: {message[-1] if message else type(err).__name__} (all output: {log})",
              file=sys.stderr)
        return None
    from pipeline import run_mirror

    return run_mirror.read_run_json(cfg, "final_metrics.json") or {}


def async_eval_cpus(cfg: Config) -> float:
    """CPUs the eval.async actor holds beside the ranks (0 without eval.async)."""
    return cfg.eval.async_num_cpus if cfg.eval.async_ else 0.0


def check_cluster_fits(cfg: Config, use_gpu: bool, totals: dict) -> None:
    """With eval.async the ranks and the evaluation actor must fit the cluster together: Ray would otherwise
    start the ranks and leave the actor waiting for resources that never free up."""
    if not cfg.eval.async_:
        return
    needed = {"CPU": cfg.ray.num_workers * cfg.ray.cpus_per_worker + cfg.eval.async_num_cpus,
              "GPU": cfg.ray.num_workers * cfg.ray.gpus_per_worker * use_gpu + cfg.eval.async_num_gpus}
    for resource, amount in needed.items():
        if amount > totals.get(resource, 0) + 1e-9:
            key = "eval.async_num_cpus" if resource == "CPU" else "eval.async_num_gpus"
            raise ConfigError(key, f"the training ranks and the evaluation actor need {amount:g} {resource}s, the "
                                   f"Ray cluster has {totals.get(resource, 0):g}")


def start_private_ray(num_cpus: int, **init_kwargs) -> None:
    """A local Ray cluster of this process's own, whatever else runs on the machine.

    address="local": without it Ray attaches to whatever its session pointer file names (another user's
    cluster, or a dead one left behind). The dashboard serves Ray's state API, which Ray Train's actors poll
    (on loopback only). Those actors (its placement-group cleaner) call the state API with no address, and
    Ray then picks a cluster by scanning the machine: with another Ray running here it fails ("Found multiple
    active Ray instances") or finds the one the pointer file names. So every process of the job is told ours,
    through RAY_API_SERVER_ADDRESS, on a dashboard port chosen here."""
    import ray

    from pipeline.trainer import free_port

    dashboard_port = free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}},
             **init_kwargs)


def print_summary(final: dict, run_dir) -> None:
    """The run's last numbers for people (accuracies in percent); a run dir finished by an older version
    (relaunched with nothing left to train) has its final metrics under the old keys: read them as today's."""
    from pipeline.metrics import as_text, from_legacy

    final = from_legacy(final)
    parts = [f"step {final.get('step')}"]
    zero_shot = [k for k in final if k.startswith("val/zeroshot/") and k.endswith("/acc1")]
    for key in ("val/top1", "val/top5", "val/ema/top1", *zero_shot, "train/loss"):
        if key in final:
            parts.append(f"{key} {as_text(key, final[key])}")
    if "val/samples" in final:  # every metric with the number of samples it was computed on
        parts.append(f"val/samples {final['val/samples']} of {final.get('val/expected_samples', '?')}")
    print(f"[launch] done: {' | '.join(parts)}", flush=True)
    for warning in dict.fromkeys(w for key, value in final.items() if key.endswith("warnings") for w in value):
        print(f"[launch] warning: {warning}", flush=True)
    print(f"[launch] run dir: {run_dir} (metrics.jsonl, config.yaml, checkpoints/)", flush=True)
