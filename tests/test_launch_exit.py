"""`launch eval` from the command line ends without the interpreter's teardown once its result is written
(pipeline.process_exit): freeing torch, open_clip and the model cost ~0.8 s of a ~8 s zero-shot command
(benchmarks/RESULTS.md, issue 15). Exit handlers still run, the result and exit code are unchanged."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs `launch` as its __main__ does (main() reads sys.argv), after registering an exit handler and an object
# whose finaliser only a teardown runs.
_AS_THE_COMMAND = """
import atexit, sys
atexit.register(print, 'exit-handler-ran', file=sys.stderr)
class Torn:
    def __del__(self):
        print('torn-down', file=sys.stderr)
KEPT = Torn()
sys.argv = ['launch', *sys.argv[1:]]
from launch.cli import main
sys.exit(main())
"""


def _launch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _AS_THE_COMMAND, *argv], capture_output=True, text=True, cwd=REPO)


def test_eval_ends_without_teardown_after_writing_its_result(tmp_path: Path) -> None:
    from test_evaluation_helpers import write_toy_zeroshot_set

    name, weights, data = write_toy_zeroshot_set(tmp_path)
    out = _launch("eval", "zeroshot", "--checkpoint", str(weights), "--model", str(tmp_path / "configs" / f"{name}.json"),
                  "--data", str(data), "--workers", "1", "--device", "cpu", "--output", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    printed = json.loads(out.stdout)  # stdout flushed before the exit
    assert printed["metrics"]["num_samples"] == 6
    assert json.loads((tmp_path / "r.json").read_text()) == printed
    lines = out.stderr.splitlines()
    assert lines[-1] == "exit-handler-ran" and "torn-down" not in lines, lines[-5:]


def test_eval_error_keeps_its_code_and_message(tmp_path: Path) -> None:
    out = _launch("eval", "zeroshot", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path / "missing"))
    assert out.returncode == 2 and "--data" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.splitlines()[-1] == "exit-handler-ran"


def test_other_commands_keep_the_normal_exit() -> None:
    out = _launch("status", "--help")
    assert out.returncode == 0 and "torn-down" in out.stderr.splitlines(), out.stderr[-2000:]
