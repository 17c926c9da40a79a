"""`tuneforge ui`: a local web page to set up, launch, watch, compare and try fine-tuning runs.

It reads what runs write (config.yaml, metrics.jsonl, summary.json, final/) and launches the
command line (`tuneforge train CONFIG`) as a child process: the web process never trains. The
server needs the optional extra ``tuneforge[ui]`` (Starlette and uvicorn); see docs/ui.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tuneforge.core.errors import UserError


def serve(runs_dir: str, data_dirs: list[str] | None, host: str, port: int) -> None:
    """Start the page (see ``tuneforge.apps.ui.server.serve``), once its extra is installed; without data
    folders named, ./data is one if it exists."""
    if data_dirs is None:
        data_dirs = ["data"] if Path("data").is_dir() else []
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the web page needs {' and '.join(missing)}, which are not installed", "tuneforge ui",
                        fix='pip install "tuneforge[ui]"')
    from tuneforge.apps.ui.server import serve as run

    run(runs_dir, data_dirs, host=host, port=port)
