"""metrics.jsonl: one JSON object per line, appended as the run goes.

Each line is written whole or not at all: a failed write (a full disk) is cut back to where the
line began, and the run stops with one line saying so. A reader still meets a torn last line if the
machine itself went down mid-write; ``read`` drops it and says how many lines it dropped, so a
resumed run or a plot never fails on one.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from tuneforge.core.atomic import disk_error, write_text


def append(path: Path, record: dict) -> None:
    line = memoryview((json.dumps(record) + "\n").encode())
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing is left to fail again on close
        start = f.tell()
        try:
            while line:  # a write stops short at a full disk or at the file-size limit alike: the next one
                written = f.write(line)  # fails with the errno that tells them apart
                if not written:
                    raise OSError(errno.EIO, "the write made no progress")
                line = line[written:]
            os.fsync(f.fileno())
        except OSError as exc:
            try:
                f.truncate(start)
            except OSError:
                pass
            raise disk_error(exc, path) from exc


def read(path: Path) -> tuple[list[dict], int]:
    """(the records, how many lines were dropped as torn or malformed)."""
    if not path.exists():
        return [], 0
    records, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # torn, or nested past what the parser follows
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            dropped += 1
    return records, dropped


def truncate_after(path: Path, step: int) -> int:
    """Keep the records of steps up to ``step`` (a resumed run logs the later ones again); returns the
    number of lines dropped as torn or malformed."""
    records, dropped = read(path)
    write_text(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    return dropped
