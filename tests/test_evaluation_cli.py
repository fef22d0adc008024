"""`launch eval` / `launch export` wiring: the subcommands parse, run, write JSON, and turn user
mistakes into one-line ValueErrors (the launcher prints them without a traceback)."""
from __future__ import annotations

import argparse
import json

import pytest

from launch import eval_cmd, export_cmd
from launch.cli import main as launch_main
from test_evaluation_helpers import write_toy_zeroshot_set


@pytest.fixture(scope="module")
def launcher() -> argparse.ArgumentParser:
    # What launch/cli.py does: one parser, each command module registers itself.
    parser = argparse.ArgumentParser(prog="launch")
    sub = parser.add_subparsers(dest="command", required=True)
    eval_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    return parser


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_toy_zeroshot_set(tmp_path_factory.mktemp("cli"))


def test_eval_zeroshot_writes_result(launcher, setup, tmp_path, capsys):
    name, weights, data = setup
    out = tmp_path / "results" / "zs.json"
    args = launcher.parse_args(["eval", "zeroshot", "--checkpoint", str(weights), "--model", name,
                                "--data", str(data), "--output", str(out), "--workers", "0", "--device", "cpu"])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_classification" and result["metrics"]["num_samples"] == 6
    assert json.loads(capsys.readouterr().out) == result


def test_export_command(launcher, setup, tmp_path, capsys):
    name, weights, _ = setup
    args = launcher.parse_args(["export", "--checkpoint", str(weights), "--model", name, "--format", "safetensors",
                                "--output", str(tmp_path / "m.safetensors")])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == [str(tmp_path / "m.safetensors")] and printed["library"] == "open_clip"


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size"),
    (["--data", "/no/such/dir"], "no such folder"),
])
def test_user_errors_are_value_errors(launcher, setup, extra, message):
    name, weights, data = setup
    argv = ["eval", "classify", "--checkpoint", str(weights), "--model", name, "--data", str(data), *extra]
    args = launcher.parse_args(argv)
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_linear_probe_method_option(launcher, setup):
    name, weights, data = setup
    base = ["eval", "linear-probe", "--checkpoint", str(weights), "--model", name, "--data", str(data)]
    assert eval_cmd._options(launcher.parse_args(base)).probe_method == "logistic_regression"  # the default
    chosen = eval_cmd._options(launcher.parse_args([*base, "--method", "clip_benchmark"]))
    assert chosen.probe_method == "clip_benchmark"
    args = launcher.parse_args([*base, "--method", "svm"])
    with pytest.raises(ValueError, match="--method: .*unknown method 'svm' .valid: logistic_regression, clip_bench"):
        args.func(args)
    with pytest.raises(SystemExit):  # only the linear probe has methods
        launcher.parse_args(["eval", "zeroshot", "--checkpoint", "x", "--data", "y", "--method", "clip_benchmark"])


def test_eval_plan_takes_the_probe_method(tmp_path):
    from pipeline.evaluation.plan import load_plan

    plan = tmp_path / "plan.yaml"
    body = "output_dir: x\ncheckpoints: [a]\ndatasets: [{path: d, tasks: [linear-probe]}]\n"
    plan.write_text(body + "probe_method: clip_benchmark\n")
    assert load_plan(plan).options.probe_method == "clip_benchmark"
    plan.write_text(body)
    assert load_plan(plan).options.probe_method == "logistic_regression"
    plan.write_text(body + "probe_method: svm\n")
    with pytest.raises(ValueError, match=r"plan.yaml: probe_method: unknown method 'svm'"):
        load_plan(plan)


def test_eval_plan_takes_matryoshka_widths(tmp_path):
    from pipeline.evaluation.plan import load_plan

    plan = tmp_path / "plan.yaml"
    body = "output_dir: x\ncheckpoints: [a]\ndatasets: [{path: d, tasks: [zeroshot]}]\n"
    plan.write_text(body)
    assert load_plan(plan).embed_dims == (None,)  # the full width only, as without --embed-dim
    plan.write_text(body + "embed_dims: [null, 32, 16, 32]\n")
    assert load_plan(plan).embed_dims == (None, 32, 16)
    for bad in ("[0]", "32", "[]", "[true]", "[wide]"):
        plan.write_text(body + f"embed_dims: {bad}\n")
        with pytest.raises(ValueError, match=r"plan.yaml: embed_dims: expected a list of widths >= 1 or null"):
            load_plan(plan)


def test_standalone_main_prints_one_line(setup, capsys):
    name, weights, data = setup
    assert launch_main(["eval", "classify", "--checkpoint", str(weights), "--model", name, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: eval classify: needs a classifier model") and err.count("\n") == 1


def test_eval_config_runs_a_plan(launcher, setup, tmp_path, capsys):
    name, weights, data = setup
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
output_dir: {tmp_path / 'results'}
workers: 0
device: cpu
checkpoints:
  - {{ref: {weights}, model: {name}}}
datasets:
  - {{path: {data}, tasks: [zeroshot, classify]}}
""")
    args = launcher.parse_args(["eval", "--config", str(plan)])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| zeroshot | acc1 | 0." in table and "skipped: needs a classifier model" in table
    (written,) = (tmp_path / "results").glob("*.json")
    assert written.name.startswith("wds_toy__zeroshot_classification__tiny-eval-vit_")
    assert (tmp_path / "results" / "summary.md").read_text().strip() == table.strip()


def test_eval_plan_errors_name_the_key(launcher, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("output_dir: x\ncheckpoints: [a]\ndatasets: [{path: d, tasks: [zeroshoot]}]\n")
    args = launcher.parse_args(["eval", "--config", str(plan)])
    with pytest.raises(ValueError, match=r"plan.yaml: datasets\[0\].tasks: unknown task 'zeroshoot'"):
        args.func(args)
    with pytest.raises(ValueError, match="give a TASK"):
        args = launcher.parse_args(["eval"])
        args.func(args)
