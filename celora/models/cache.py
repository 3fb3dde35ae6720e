"""Where converted models are cached: ``$CELORA_CACHE`` or ``~/.cache/celora`` (one folder per asset).

A cache entry is written once into a temporary sibling folder and renamed into place, so a crash or
two concurrent runs never leave a half-written entry behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "CELORA_CACHE"


def cache_root() -> Path:
    """The cache root: ``$CELORA_CACHE`` when set, else ``~/.cache/celora``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "celora"


def cached_dir(name: str, build: Callable[[Path], None], marker: str = "config.json") -> Path:
    """The folder ``<cache root>/<name>``, built once by ``build(tmp_folder)`` when ``marker`` is missing."""
    target = cache_root() / name
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        if (target / marker).is_file():  # another process finished first
            return target
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
