"""One checkpoint format: DeepSpeed shards plus a meta.json that marks the checkpoint complete.

Layout: <run_dir>/checkpoints/step_00000100/{DeepSpeed files, meta.json}. Every rank writes its shards,
all ranks meet at a barrier, then rank 0 writes meta.json atomically (temp file + rename). A directory
without meta.json is an interrupted write and is never resumed from nor deleted by retention while
it might still be written.

Trust model: every file we read back is data. Nothing is unpickled with torch's full unpickler:
`safe_torch_load` allows tensors, plain containers and the few value classes DeepSpeed pickles into its
own files (DEEPSPEED_STATE_CLASSES); a file that names anything else is refused before it is unpickled,
with one line naming the file and the global it asked for. DeepSpeed's loaders (engine.load_checkpoint,
zero_to_fp32) pass weights_only=False to torch.load, so they run inside `_deepspeed_loads_weights_only`,
which forces every torch.load to weights-only through PyTorch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import pickletools
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
# Value classes DeepSpeed pickles beside the tensors of its checkpoint files (a loss scaler's numbers, the
# ZeRO stage enum, (numel, start) slice addresses). Allowed by name; imported only when a file names one.
DEEPSPEED_STATE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format; older files are a bare pickle stream


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def list_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_complete(run_dir: Path) -> Path | None:
    complete = list_complete(run_dir)
    return complete[-1] if complete else None


def read_meta(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable checkpoint record ({_first_line(err)})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: unreadable checkpoint record (not a JSON object)")
    return meta


def save(engine, run_dir: Path, step: int, meta: dict, client_state: dict, is_rank0: bool,
         after_shards=None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    `after_shards(step)` runs between writing the shards and marking them complete (fault drills)."""
    import torch.distributed as dist

    root = checkpoints_root(run_dir)
    tag = step_tag(step)
    ckpt_dir = root / tag
    if is_rank0 and ckpt_dir.exists():
        # A leftover from a killed write at the same step: start it afresh.
        shutil.rmtree(ckpt_dir)
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if after_shards is not None:
        after_shards(step)
    if dist.is_initialized():
        dist.barrier()
    if is_rank0:
        _write_json_atomic(ckpt_dir / META_FILE, {**meta, "step": step, "complete": True})
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir


def load(engine, ckpt_dir: Path) -> dict:
    """Restore engine (weights, optimizer, scheduler) in place; returns the saved client state.

    ValueError (one line naming the file) for a missing, truncated or code-carrying file."""
    ckpt_dir = Path(ckpt_dir)
    verify_files(ckpt_dir, read_meta(ckpt_dir))
    with _deepspeed_loads_weights_only(ckpt_dir):
        load_path, client_state = engine.load_checkpoint(
            str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise ValueError(f"{ckpt_dir}: DeepSpeed found no checkpoint to load there")
    return client_state or {}


def apply_retention(run_dir: Path, keep_last: int, keep_every: int,
                    protected: frozenset[Path] | set[Path] = frozenset()) -> list[Path]:
    """Delete old complete checkpoints; the newest complete one always survives, and so does every `protected`
    one (eval.async has not evaluated it yet; a later call deletes it). Returns deleted dirs."""
    complete = list_complete(run_dir)
    kept_steps = retained_steps([int(_STEP_DIR.match(p.name).group(1)) for p in complete], keep_last, keep_every)
    keep = {p for p in complete if int(_STEP_DIR.match(p.name).group(1)) in kept_steps or p in protected}
    deleted = []
    for path in complete:
        if path not in keep:
            # Remove the completeness mark first: a crash mid-delete leaves an incomplete dir, never a
            # "complete" one with missing shards.
            (path / META_FILE).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Which of these complete checkpoints retention keeps: the newest keep_last (at least one) and every
    multiple of keep_every. One rule for run directories on disk and in a bucket (pipeline.run_mirror)."""
    ordered = sorted(steps)
    keep = set(ordered[-max(keep_last, 1):])
    if keep_every > 0:
        keep |= {step for step in ordered if step % keep_every == 0}
    return keep


def load_consolidated(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """fp32 model weights from a checkpoint of any ZeRO stage and world size, plus its meta.json."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / META_FILE).is_file():
        raise ValueError(f"{ckpt_dir}: not a complete checkpoint (no {META_FILE})")
    meta = read_meta(ckpt_dir)
    verify_files(ckpt_dir, meta)
    if meta.get("zero_stage", 0) > 0:
        # DeepSpeed narrates its import and the consolidation on stdout (its logger binds sys.stdout when
        # first imported); commands whose stdout is JSON need it on stderr.
        with contextlib.redirect_stdout(sys.stderr), _deepspeed_loads_weights_only(ckpt_dir):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    else:
        blob = safe_torch_load(ckpt_dir / MODEL_STATES_FILE, deepspeed_state=True)
        if not isinstance(blob, dict) or not isinstance(blob.get("module"), dict):
            raise ValueError(f"{ckpt_dir / MODEL_STATES_FILE}: not a DeepSpeed model-states file (no 'module')")
        state = blob["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, meta


def expected_files(meta: dict) -> list[str]:
    """The DeepSpeed files a checkpoint of this ZeRO stage and world size holds (meta.json records both)."""
    stage, world_size = int(meta.get("zero_stage", 0)), int(meta.get("world_size", 1))
    if stage == 3:  # parameters are partitioned too: one model-states file per rank
        names = [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in range(world_size)]
    else:
        names = [MODEL_STATES_FILE]
    if stage > 0:
        names += [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(world_size)]
    return names


def verify_files(ckpt_dir: Path, meta: dict) -> None:
    """Every file the checkpoint should hold is there, is whole, and unpickles to data only.

    Reads each file's pickle (tensor bytes are memory-mapped, not read), so it costs little next to the load
    that follows. A file swapped between this check and DeepSpeed's load still cannot run code: that load
    is forced weights-only too; this check is what names the file."""
    ckpt_dir = Path(ckpt_dir)
    missing = [name for name in expected_files(meta) if not (ckpt_dir / name).is_file()]
    if missing:
        raise ValueError(f"{ckpt_dir / missing[0]}: missing from the checkpoint "
                         f"(ZeRO stage {meta.get('zero_stage', 0)}, world size {meta.get('world_size', 1)} "
                         f"checkpoints hold {len(expected_files(meta))} .pt files)")
    for path in sorted(ckpt_dir.glob("*.pt")):
        safe_torch_load(path, deepspeed_state=True, mmap=True)


# -- loading untrusted files ------------------------------------------------------------------------


def safe_torch_load(path: str | Path, deepspeed_state: bool = False, mmap: bool = False) -> Any:
    """torch.load(weights_only=True) of a file nobody vouches for; ValueError naming the file when it is
    truncated, not a torch file, or names a global (a class or function) beyond tensors and plain data.

    `deepspeed_state` also allows DEEPSPEED_STATE_CLASSES (our checkpoints' DeepSpeed files)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            is_zip = handle.read(4) == _ZIP_MAGIC
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    allowed = _allowed_globals(path, is_zip, deepspeed_state)
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # "Detected pickle protocol 4 ...": torch's note on files it did not write itself; a refusal says more.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        global_name, reason = _unpickler_refusal(err)
        global_name = global_name or next(iter(_bare_pickle_globals(path)), None)
        if global_name:
            raise ValueError(_refusal(path, global_name)) from None
        raise ValueError(f"{path}: corrupt or not a PyTorch weights file ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        raise ValueError(f"{path}: corrupt or not a PyTorch weights file ({_first_line(err)})") from None


def _allowed_globals(path: Path, is_zip: bool, deepspeed_state: bool) -> list:
    """The classes this file may name. A zip file's pickle is read statically (nothing runs) and any
    global outside the allowed set refuses the file before it is unpickled; the older bare-pickle
    format cannot be read ahead, and the weights-only unpickler refuses it the moment it names one."""
    if not is_zip:
        return [_import_class(name) for name in DEEPSPEED_STATE_CLASSES] if deepspeed_state else []
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, OSError, KeyError) as err:  # the zip's index sits at its end
        raise ValueError(f"{path}: truncated or corrupt: its zip archive cannot be read ({_first_line(err)})") from None
    allowed = DEEPSPEED_STATE_CLASSES if deepspeed_state else ()
    refused = sorted(name for name in needed if name not in allowed)
    if refused:
        raise ValueError(_refusal(path, refused[0]))
    return [_import_class(name) for name in needed]


def _bare_pickle_globals(path: Path) -> list[str]:
    """Globals the first pickle of a bare-pickle file names, read with pickletools (nothing is executed):
    which one made the weights-only unpickler stop, for the message."""
    names, strings = [], []
    try:
        with path.open("rb") as handle:
            for opcode, arg, _ in pickletools.genops(handle):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - garbage bytes: no name to report, the caller says corrupt
        pass
    return names


def _refusal(path: Path, global_name: str) -> str:
    return (f"{path}: refused: unpickling it would call {global_name}, which could run code; checkpoint "
            "and weights files are loaded as data only (tensors and plain containers)")


def _import_class(qualified_name: str):
    module, _, name = qualified_name.rpartition(".")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed narrates its import on stdout
        return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def _deepspeed_loads_weights_only(ckpt_dir: Path):
    """DeepSpeed's loaders call torch.load(weights_only=False); inside this block PyTorch's documented
    switch TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes every torch.load weights-only whatever its call says, with
    DeepSpeed's value classes allowed. It is process-wide while it lasts: a torch.load in another thread
    is forced too, which only makes that load stricter."""
    saved = {name: os.environ.pop(name, None) for name in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([_import_class(name) for name in DEEPSPEED_STATE_CLASSES]):
            yield
    except pickle.UnpicklingError as err:  # verify_files passed, so a file changed under us since
        global_name, reason = _unpickler_refusal(err)
        raise ValueError(f"{ckpt_dir}: refused: a checkpoint file changed while it was loaded and is no "
                         f"longer plain data ({global_name or reason})") from None
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _unpickler_refusal(err: pickle.UnpicklingError) -> tuple[str | None, str]:
    """(the global the weights-only unpickler refused, or None; its reason in one line). torch's own message
    runs to a dozen lines of advice on loading the file anyway, which is not ours to pass on."""
    text = str(err)
    named = re.search(r"GLOBAL (\S+)", text)
    detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    reason = " ".join(detail.split()) if "WeightsUnpickler error:" in text else _first_line(err)
    if not reason or "weights_only" in reason:  # torch's advice, not a reason
        reason = "the weights-only unpickler refused it"
    return (named.group(1) if named else None), reason


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)
