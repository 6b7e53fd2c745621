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


WEIGHT_FILE_PREFIXES = ("model", "pytorch_model", "adapter_model")


@contextlib.contextmanager
def atomic_save_dir(save_directory: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder for ``save_pretrained``; on success its files land in ``save_directory``.

    A new folder appears in one rename. An existing one gets each file by an atomic replace (other files in it,
    such as training checkpoints, stay), and weight files the new save no longer has are removed, as
    transformers does; a crash before that leaves the previous save whole.
    """
    final = Path(save_directory).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield str(tmp)
        if not final.exists():
            os.replace(tmp, final)
            return
        written = {p.name for p in tmp.iterdir()}
        for stale in final.iterdir():
            is_weights = stale.name.startswith(WEIGHT_FILE_PREFIXES) and stale.suffix in (".safetensors", ".json")
            if stale.is_file() and is_weights and stale.name not in written and stale.name != "config.json":
                stale.unlink()
        for item in tmp.iterdir():
            target = final / item.name
            if item.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
