"""Atomic writes: write to a temporary file in the same folder, then rename over the target."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(tmp_path)` and renames tmp_path to `path`; a crash leaves the old file intact. A write that fails
    (a full disk: an OSError, or torch.save's RuntimeError) raises an OSError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any other file
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
        detail = " ".join(str(err.strerror if isinstance(err, OSError) and err.strerror else err).split())[:160]
        raise OSError(code, f"cannot be written ({detail}; a full disk?)", str(path)) from None
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def check_folder(path: str | Path, key: str) -> Path:
    """`path`, when it is a folder or can become one (nothing is created); ConfigError naming `key` when it or
    the nearest existing ancestor is a file."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise ConfigError(f"{key}={str(path)!r}: must be a folder, not a file{where}")
    return path


def save_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_torch(path: str | Path, obj: Any) -> Path:
    """torch.save of tensors/dicts of plain types, loadable with torch.load(weights_only=True)."""
    return atomic_write(path, lambda p: torch.save(obj, p))


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) with a clear error for a missing, truncated or tampered file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        detail = " ".join(str(err).split())[:160]  # one line: torch's messages span several
        raise ValueError(
            f"{path}: cannot be loaded as a weights-only torch file: truncated, corrupt, or holding objects other "
            f"than tensors and plain containers ({type(err).__name__}: {detail})"
        ) from None
