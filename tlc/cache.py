"""The per-user cache folder of tlc: built Mojo extensions and the universal weights."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return `$TLC_CACHE_DIR`, else `$XDG_CACHE_HOME/tlc`, else `~/.cache/tlc`."""
    override = os.environ.get("TLC_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tlc"
