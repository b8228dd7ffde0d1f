"""Reading the text and JSONL files users hand to `train` and `eval`, with errors that name file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


def read_text(path: str, error: type[Exception]) -> str:
    """The whole file; `error` names a missing or empty one."""
    if not os.path.isfile(path):
        raise error(f"{path}: no such file")
    with open(path, encoding="utf-8") as fh:
        raw = fh.read()
    if not raw.strip():
        raise error(f"{path}: empty file")
    return raw


def json_lines(path: str, raw: str, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; `error` names a line that is not a JSON object."""
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{n}: expected a JSON object")
        yield n, row


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))
