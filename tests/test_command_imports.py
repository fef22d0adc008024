"""What a `launch` command imports: only its own module (launch/cli.py), and for `launch eval` not wandb
(pipeline.import_guard hides it from timm's import-time probe, ~0.5 s per command; it imports normally after)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.import_guard import hidden_modules

REPO = Path(__file__).resolve().parent.parent


def test_hidden_only_inside_the_block_and_never_for_an_imported_module():
    script = """
import sys
from pipeline.import_guard import hidden_modules
import json
with hidden_modules("wandb", "json"):
    try:
        import wandb.sdk
        print("imported inside")
    except ImportError:
        print("hidden inside")
    import json  # already imported: unaffected
assert "wandb" not in sys.modules
import wandb
print("imported after", wandb.__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["hidden inside", "imported after wandb"]


def test_a_hidden_module_a_library_needs_is_imported_after_all():
    """A library that asks for a hidden module in a way it does not catch (here: PIL, which evaluation
    imports outright; in real life importlib.util.find_spec) gets it on a second, unhidden import: hiding
    saves start-up time and must never break the command."""
    script = """
import argparse, sys
from launch import eval_cmd
eval_cmd.hidden_while_importing = lambda args: ("PIL", "wandb")
eval_cmd.import_evaluation(argparse.Namespace())
import pipeline.evaluation.tasks, PIL
print("imported", "pipeline.evaluation.tasks" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["imported", "True"]


def test_launch_eval_imports_no_wandb(tmp_path):
    """The eval command scores as before and never imports wandb: timm's probe (through open_clip) was
    answered "not installed" (wandb is installed in the test environment)."""
    pytest.importorskip("wandb")
    from test_evaluation_helpers import write_toy_zeroshot_set

    name, weights, data = write_toy_zeroshot_set(tmp_path)
    command = ("import sys; from launch.cli import main; rc = main(sys.argv[1:]); "
               "print('imported:', *sorted({m.split('.')[0] for m in sys.modules}), file=sys.stderr); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", command, "eval", "zeroshot", "--checkpoint", str(weights),
                          "--model", str(tmp_path / "configs" / f"{name}.json"), "--data", str(data),
                          "--workers", "0", "--device", "cpu"], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout)["metrics"]["num_samples"] == 6
    imported = next(line for line in out.stderr.splitlines() if line.startswith("imported:")).split()
    assert "open_clip" in imported and "timm" in imported and "wandb" not in imported
    assert "huggingface_hub" not in imported  # a local checkpoint: nothing asks the hub
    assert "triton" not in imported  # torch._dynamo's probe (through torchvision): evaluation compiles nothing


@pytest.mark.parametrize("argv, hidden", [
    (["eval", "zeroshot", "--checkpoint", "w.pt", "--model", "ViT-B-32", "--data", "d"],
     ("wandb", "triton", "huggingface_hub")),
    (["eval", "zeroshot", "--checkpoint", "w.pt", "--model", "hf-hub:org/repo", "--data", "d"], ("wandb", "triton")),
    (["eval", "classify", "--checkpoint", "hf-hub:org/repo", "--data", "d"], ("wandb", "triton")),
    (["eval", "--config", "plan.yaml"], ("wandb", "triton")),  # a plan may name anything: the hub stays importable
    (["eval", "--follow", "runs/x"], ("wandb", "triton")),
])
def test_the_hub_is_hidden_only_when_no_reference_can_need_it(argv, hidden):
    """open_clip and timm ask at import whether huggingface_hub is installed (~0.26 s of the command: httpx
    and the hub client); only an `hf-hub:` reference needs it, and they remember the answer."""
    from launch.cli import build_parser
    from launch.eval_cmd import hidden_while_importing

    assert hidden_while_importing(build_parser(argv).parse_args(argv)) == hidden


@pytest.mark.parametrize("command", [["status", "--help"], ["submit", "--address", "http://127.0.0.1:1", "--help"]])
def test_a_command_imports_only_its_module(command):
    """`launch status` does not import torch, open_clip or DeepSpeed for the other commands' parsers (the
    export command's module imports them: ~6 CPU s before any command ran)."""
    script = ("import sys; from launch.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('imported:', *sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, cwd=REPO, check=True)
    imported = next(line for line in out.stdout.splitlines() if line.startswith("imported:")).split()
    assert "launch" in imported and not {"torch", "open_clip", "deepspeed", "timm"} & set(imported)
