"""Which code made a result: the package's version and, when it runs from a git
checkout, the commit and whether tracked files differed from it.

  {"package_version": "0.1.0", "git_commit": "472f4cb...", "git_dirty": false}

`git_commit` and `git_dirty` are None where cg_tf is not its own checkout (an
installed wheel, an image built without .git). Run records (config.json,
summary.json), stage manifests and the sweep's summary.csv carry it; it never
takes part in deciding whether a run or stage matches, so a run resumed by
newer code continues (its config.json keeps the starting code's provenance,
its summary.json the finishing code's).
"""

import functools
import os
import subprocess
from importlib import metadata

FIELD = "provenance"  # the key under which records hold it
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    """The output of `git -C <checkout> args`, or None if git or the checkout is missing."""
    try:
        out = subprocess.run(["git", "-C", _ROOT, *args], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _package_version() -> str | None:
    try:
        return metadata.version("cg_tf")
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def provenance() -> dict:
    """This process's code: package version, git commit and dirtiness (cached:
    the code a process runs does not change under it)."""
    top = _git("rev-parse", "--show-toplevel")
    own = top is not None and os.path.realpath(top) == os.path.realpath(_ROOT)
    commit = _git("rev-parse", "HEAD") if own else None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"package_version": _package_version(), "git_commit": commit,
            "git_dirty": None if status is None else bool(status)}

