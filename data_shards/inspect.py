"""`shards inspect`: count samples per task and per shard from the shards themselves, against manifest.json.

Only json members are read (data_shards/members.py: bounded, regular files only, never unpickled); an
unreadable shard, a malformed member or manifest is an error line of the report, never a traceback.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import zlib
from collections import Counter
from pathlib import Path

from unirestorer.data_shards.members import member_field, members, sample_json
from unirestorer.data_shards.writer import MANIFEST, TEMPORARY, ShardWriteError
from unirestorer.safe_json import JsonError, read_json, regular_file


def _count(path: Path) -> tuple[Counter, int]:
    """(samples per task, samples without all of lq.png, gt.png, json) of one shard; raises on damage."""
    regular_file(path, "shard")
    counts, keys = Counter(), Counter()
    with open(path, "rb") as f:
        for name, data in members(f, path.name, lambda n: member_field(n) == "json"):
            keys[name.partition(".")[0]] += 1
            if data is not None:
                counts[sample_json(data, f"{path.name}: {name}")["task"]] += 1
    return counts, sum(1 for n in keys.values() if n != 3)


def inspect_shards(out: str | os.PathLike) -> dict:
    """Count samples per task and per shard by reading the shards (json members only) and compare with
    manifest.json. Unreadable shards, bad members or manifest and leftover temp files are listed."""
    out = Path(out)
    if not out.is_dir():
        raise ShardWriteError(f"{out}: no such directory")
    shards, tasks, errors = [], Counter(), []
    for path in sorted(out.glob("shard-*.tar")):
        try:
            counts, incomplete = _count(path)
        except (tarfile.TarError, OSError, ValueError, EOFError, zlib.error, lzma.LZMAError) as e:
            errors.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
            continue
        if incomplete:
            errors.append(f"{path.name}: {incomplete} samples without all of lq.png, gt.png, json")
        shards.append({"name": path.name, "samples": sum(counts.values()), "tasks": dict(sorted(counts.items()))})
        tasks.update(counts)
    report = {"out": str(out), "num_samples": sum(tasks.values()), "tasks": dict(sorted(tasks.items())),
              "shards": shards, "errors": errors,
              "temporary_files": sorted(p.name for p in out.iterdir() if TEMPORARY.fullmatch(p.name)), "manifest": None}
    if (out / MANIFEST).exists() or (out / MANIFEST).is_symlink():
        try:
            manifest = read_json(out / MANIFEST)
            if not isinstance(manifest, dict):
                raise JsonError(f"{out / MANIFEST}: expected a JSON object")
        except JsonError as err:
            errors.append(str(err))
        else:
            report["manifest"] = {"kind": manifest.get("kind"),
                                  "matches": manifest.get("tasks") == report["tasks"] and manifest.get("shards") == shards}
    return report
