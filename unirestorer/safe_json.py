"""Reading JSON that a user or an attacker may have written: bounded size, bounded nesting, regular files only.

`json.loads` of a deeply nested document raises RecursionError, a FIFO named like a JSON file blocks the
reader forever, and a member of a compressed archive can inflate to gigabytes. Every JSON the project
reads from a user's files (bundle.json, shard members and manifests, checkpoint markers) comes through
here, and every failure is one `JsonError` (a ValueError) naming the file or member and the problem.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class JsonError(ValueError):
    """Unusable JSON; the message names where it came from."""


def nesting(data: bytes) -> int:
    """The deepest [ / { nesting of a JSON text (brackets inside strings do not count)."""
    codes = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int32) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: bytes, where: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse `data` (from `where`) after checking its size and nesting."""
    if len(data) > max_bytes:
        raise JsonError(f"{where}: {len(data)} bytes of JSON exceeds the limit of {max_bytes}")
    if (depth := nesting(data)) > max_depth:
        raise JsonError(f"{where}: JSON nested {depth} deep exceeds the limit of {max_depth}")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise JsonError(f"{where}: not valid JSON ({err})") from None


def regular_file(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """stat of `path`, which must be a regular file (links followed): FIFOs and devices would block or
    never end; JsonError otherwise, naming it."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise JsonError(f"{path}: cannot read this {what} ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise JsonError(f"{path}: not a regular file (a FIFO, device or folder); refusing to read it")
    return st


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file: regular, at most `max_bytes`, nested at most `max_depth` deep."""
    if regular_file(path).st_size > max_bytes:
        raise JsonError(f"{path}: larger than the limit of {max_bytes} bytes for a JSON file")
    with open(path, "rb") as f:
        return parse_json(f.read(max_bytes + 1), str(Path(path)), max_bytes, max_depth)
