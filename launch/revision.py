"""The git revision of a source folder: what a run's versions.json and a submitted job's metadata record."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_revision(folder: str | Path) -> dict:
    """{"revision": the commit (None outside a git checkout), "dirty": tracked files differ from it}."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    revision = git("rev-parse", "HEAD") or None
    return {"revision": revision, "dirty": bool(revision and git("status", "--porcelain", "--untracked-files=no"))}


def revision_text(revision: dict) -> str:
    """'COMMIT', 'COMMIT+dirty' or 'unknown', for one-line displays."""
    if not revision.get("revision"):
        return "unknown"
    return revision["revision"] + ("+dirty" if revision.get("dirty") else "")
