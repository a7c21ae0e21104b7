"""Built-in models built once into the cache, safely when several processes start at once.

One process builds under a file lock into a temporary directory and renames
it into place; the others wait on the lock and then find it. A reader never
sees a half-written model: the directory appears with its manifest in one rename.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .registry import MANIFEST


def ensure_built(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, after `build(tmp_dir)` has written the model there, if it was not already built."""
    if (final / MANIFEST).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / MANIFEST).is_file():
            _clear_leftovers(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
            try:
                build(tmp)
                _make_readable(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


def _clear_leftovers(final: Path) -> None:
    """Remove what a killed builder left (called under the lock, so nobody is building)."""
    for tmp in final.parent.glob(f".{final.name}-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if final.exists():     # a directory without a manifest is not a model
        shutil.rmtree(final)


def _make_readable(root: Path) -> None:
    """mkdtemp makes a private directory; a model cache is readable like any other."""
    os.chmod(root, 0o755)
    for f in root.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
