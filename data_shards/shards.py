"""Reading shard sets safely: which files a set names, the order streams read them in, and every way a shard can
fail (missing, unreadable, not a tar, truncated, a failing `pipe:` command, a set with no sample at all) counted,
logged and skipped, so a long run survives one bad shard and stops, naming the set, when nothing can be read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from unirestorer.safe_json import regular_file

log = logging.getLogger(__name__)

# this many failures in a row is a configuration error (wrong files, wrong format), not bad luck
MAX_FAILED_SHARDS_IN_A_ROW = 100
MAX_BAD_SAMPLES_IN_A_ROW = 1000


def expand_source(spec: str) -> list[str]:
    """Brace-expand one shard set, or take a folder's shard-*.tar (what `shards write` makes); local
    shards must exist (a typo should fail now, not mid-run)."""
    if "://" not in spec and not spec.startswith("pipe:") and Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("shard-*.tar"))
        if not urls:
            raise FileNotFoundError(f"shard set {spec!r}: a folder without shard-*.tar files")
        return urls
    urls = expand_urls(spec)
    local = [u for u in urls if not u.startswith("pipe:") and urlparse(u).scheme in ("", "file")]
    missing = [u for u in local if not _path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard set {spec!r}: no such shard file {missing[0]}{more}")
    return urls


def _path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file:") else url)


def shard_order(urls: list[str], stream: int, n_streams: int, rng: np.random.Generator) -> Iterator[str]:
    """Entries stream, stream + n_streams, ... of an endless chain of permutations of `urls`."""
    position = 0
    while True:
        perm = rng.permutation(len(urls))
        yield from (urls[i] for i in perm[(stream - position) % n_streams :: n_streams])
        position += len(urls)


class _TarEnd:
    """Read-through wrapper that keeps the last 1 KiB: a complete tar ends in two zero blocks.

    Python's tarfile treats a shard cut inside a header as a normal end of archive, so this is the
    only way to see that truncation. Compressed shards are left to their codec's own checks.
    """

    def __init__(self, f) -> None:
        self.f, self.head, self.tail = f, b"", b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if not self.head:
            self.head = data[:8]
        self.tail = (self.tail + data[-1024:])[-1024:]
        return data

    def complete(self) -> bool:
        while self.read(1 << 16):
            pass
        if self.head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
            return True
        return len(self.tail) == 1024 and self.tail.count(0) == 1024


class EmptyShardsError(ValueError):
    """A shard set that yields no sample at all: the stream would wait forever."""


class PassWatch:
    """Raises EmptyShardsError once every shard of one set was read, with no file out of any of them."""

    def __init__(self, spec: str, urls: list[str]) -> None:
        self.spec, self.urls, self.empty, self.got_file = spec, set(urls), set(), False

    def files(self, stream: Iterator[dict]) -> Iterator[dict]:
        for item in stream:
            self.got_file |= "fname" in item  # tar_file_expander also yields {} at each shard's end
            yield item

    def shard_done(self, url: str) -> None:
        """Called once a shard's read is over (all its files have been passed on)."""
        if self.got_file:
            self.empty.clear()
        else:
            self.empty.add(url)
        self.got_file = False
        if self.empty >= self.urls:
            raise EmptyShardsError(f"shard set {self.spec!r}: a full pass over its {len(self.urls)} shard(s) gave "
                                   f"no sample (empty tars, directories only, or unreadable; see warnings above)")


class Skips:
    """Counts and logs what one worker skipped; `take()` hands over the counts since the last call."""

    def __init__(self) -> None:
        self.shards = self.samples = 0
        self.url, self.failed, self.failed_in_a_row, self.bad_in_a_row = "", False, 0, 0

    def begin(self, url: str) -> None:
        self.url, self.failed = url, False

    def shard_error(self, exn: BaseException) -> bool:
        """webdataset handler: one count per shard visit, however many errors the visit raised."""
        if not self.failed:
            self.failed = True
            self.shards += 1
            self.failed_in_a_row += 1
            log.warning("skipping corrupt shard %s: %s", self.url, exn)
            if self.failed_in_a_row >= MAX_FAILED_SHARDS_IN_A_ROW:
                raise RuntimeError(f"{self.failed_in_a_row} shards in a row failed to read; last {self.url}: {exn}")
        return True

    def end(self) -> None:
        if not self.failed:
            self.failed_in_a_row = 0

    def sample_error(self, sample: dict, exn: BaseException) -> None:
        self.samples += 1
        self.bad_in_a_row += 1
        where = f"{sample.get('__key__')} in {sample.get('__url__')}"
        log.warning("skipping corrupt sample %s: %s", where, exn)
        if self.bad_in_a_row >= MAX_BAD_SAMPLES_IN_A_ROW:
            raise RuntimeError(f"{self.bad_in_a_row} samples in a row were unusable; last {where}: {exn}")

    def take(self) -> dict[str, int]:
        counts = {"shards": self.shards, "samples": self.samples}
        self.shards = self.samples = 0
        return counts


def open_shards(urls: Iterator[str], skips: Skips, watch: PassWatch | None = None) -> Iterator[dict]:
    """gopen each url (paths, pipe:, http...) for expand_members; check its end once it is read."""
    for url in urls:
        skips.begin(url)
        try:
            if not url.startswith("pipe:") and urlparse(url).scheme in ("", "file"):
                regular_file(_path(url), "shard")
            stream = gopen(url)
        except Exception as exn:  # missing, unreadable, failing pipe: count it and go on
            skips.shard_error(exn)
            if watch is not None:
                watch.shard_done(url)
            continue
        checked = _TarEnd(stream)
        try:
            yield {"url": url, "stream": checked}
            # expand_members asks for the next shard only after finishing this one
            if not skips.failed and not checked.complete():
                skips.shard_error(EOFError("truncated tar: no end-of-archive blocks"))
        finally:
            try:
                stream.close()  # a pipe: reports its command's exit status here
            except Exception as exn:
                skips.shard_error(exn)
        skips.end()
        if watch is not None:
            watch.shard_done(url)
