"""Write an output folder atomically: into a temporary sibling folder, then renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing, non-empty output folder unless ``overwrite`` (called before any work)."""
    path = Path(output_dir)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise OutputExistsError(
            f"output folder {path} already exists; choose another folder or pass overwrite=True (--overwrite)."
        )


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``output_dir``; on success it replaces ``output_dir`` in one rename.

    On error (or a kill) the temporary folder is removed or left as a hidden ``.tmp-*`` sibling, and
    ``output_dir`` is either absent or the complete previous/next version, never half-written.
    """
    final = Path(output_dir).resolve()
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield str(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
