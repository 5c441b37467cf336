"""Writing a directory all at once: into <out>.tmp, renamed to <out> when complete, so an interrupted
export or import never leaves a half-written model where a tool would load it."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import PpmoeError


@contextmanager
def fresh_directory(out: Path, flag: str = "--out", overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `out` when the block succeeds. A non-empty `out`
    is refused unless `overwrite` (then it is replaced only once the new one is complete); the temporary
    directory is removed when the block fails."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise PpmoeError(f"{flag} {out} exists and is not empty: choose a new directory, remove it, or pass "
                         f"--overwrite")
    if not out.parent.is_dir():
        raise PpmoeError(f"{flag} {out}: its parent directory {out.parent} does not exist")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
