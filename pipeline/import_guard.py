"""Keep an optional module out of a library's import-time probe.

Some libraries import optional packages only to ask whether they are installed: timm (imported by open_clip)
imports wandb for `timm.utils.summary`, ~0.5 s of every `launch eval`; pyarrow imports pandas on its first
array built from Python objects, ~0.3 s of every `data-prep` command. Nothing here uses either answer.
While `hidden_modules` is active, importing one of the named modules (or a submodule) raises ImportError,
which such probes catch; afterwards the modules import normally (a tracker that logs to W&B imports it
itself). Only the probing library keeps the "not installed" answer it got.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class _Hide:
    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".", 1)[0] in self.names:
            raise ImportError(f"{name}: hidden while another library imports (pipeline.import_guard)")


@contextlib.contextmanager
def hidden_modules(*names: str) -> Iterator[None]:
    """Imports of `names` fail inside the block unless already imported (then nothing changes for them)."""
    hook = _Hide(tuple(name for name in names if name not in sys.modules))
    sys.meta_path.insert(0, hook)
    try:
        yield
    finally:
        sys.meta_path.remove(hook)
