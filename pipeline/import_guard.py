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
from typing import Callable, Iterator


class HiddenModuleError(ImportError):
    """An import of a hidden module: what an import-time probe catches. One that escapes the block came from
    a caller that does not expect it (e.g. `importlib.util.find_spec`, which has no "absent" answer to give
    here): import again without hiding (`import_hiding`)."""


class _Hide:
    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".", 1)[0] in self.names:
            raise HiddenModuleError(f"{name}: hidden while another library imports (pipeline.import_guard)")


@contextlib.contextmanager
def hidden_modules(*names: str) -> Iterator[None]:
    """Imports of `names` fail inside the block unless already imported (then nothing changes for them)."""
    hook = _Hide(tuple(name for name in names if name not in sys.modules))
    sys.meta_path.insert(0, hook)
    try:
        yield
    finally:
        sys.meta_path.remove(hook)


def import_hiding(names: tuple[str, ...], importer: Callable[[], None]) -> None:
    """importer() with `names` hidden; if a hidden module's ImportError escapes it (a library asked in a way
    its code does not catch), importer() again without hiding: hiding saves start-up time and must never
    cost a command."""
    try:
        with hidden_modules(*names):
            importer()
    except HiddenModuleError:
        importer()
