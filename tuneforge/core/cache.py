"""Where tuneforge keeps what it can compute again: converted models and cached features."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TUNEFORGE_CACHE``, or ``~/.cache/tuneforge``."""
    return Path(os.environ.get("TUNEFORGE_CACHE") or Path.home() / ".cache" / "tuneforge")
