"""Reading a shard's tar members with bounds: the one place shard bytes are read (inspect and the loader).

A member's size comes from its header, so a member over its cap is refused before a byte of it is
read, compressed or not: a gzip'd shard could otherwise inflate one member to gigabytes in memory.
Only regular members are read; a shard must itself be a regular file (a FIFO would block forever).
"""

from __future__ import annotations

import io
import tarfile
from typing import IO, Any, Callable, Iterator

from PIL import Image

from unirestorer.safe_json import parse_json

MAX_MEMBER_BYTES = 256 << 20  # a whole 50-megapixel image as 8-bit PNG fits; nothing a shard holds is larger
MAX_JSON_MEMBER = 1 << 20


def member_field(name: str) -> str:
    """The member's field, as WebDataset groups them: 'lq.png' of '0000001_0000.lq.png'."""
    return name.partition(".")[2]


def cap(name: str) -> int:
    return MAX_JSON_MEMBER if member_field(name) == "json" else MAX_MEMBER_BYTES


def members(fileobj: IO[bytes], where: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of every regular member of a tar stream; data is read only when `wanted(name)`, else
    None. A member over its cap raises ValueError naming it (the rest of the shard is not read)."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            if info.size > cap(info.name):
                raise ValueError(f"{where}: member {info.name} is {info.size} bytes, over the limit of "
                                 f"{cap(info.name)}")
            yield info.name, tar.extractfile(info).read() if wanted(info.name) else None
            tar.members = []  # a stream of shards must not keep every header in memory


def sample_json(data: bytes, where: str) -> dict[str, Any]:
    """A sample's json member: an object with a string 'task' (ValueError naming `where` otherwise)."""
    meta = parse_json(data, where, MAX_JSON_MEMBER)
    if not isinstance(meta, dict) or not isinstance(meta.get("task"), str):
        raise ValueError(f"{where}: json member must be an object with a string 'task'")
    return meta


def expand_members(shards: Iterator[dict], handler: Callable[[BaseException], bool],
                   fields: set[str]) -> Iterator[dict]:
    """Of each opened shard, every member as {"fname", "data", "__url__"}, then {} at its end (as webdataset's
    tar_file_expander), read through the bounded `members`: only fields in `fields` are read, the others
    come with empty data. Damage goes to `handler` (the rest of that shard is skipped)."""
    for shard in shards:
        try:
            for name, data in members(shard["stream"], shard["url"], lambda n: member_field(n) in fields):
                yield {"fname": name, "data": b"" if data is None else data, "__url__": shard["url"]}
            yield {}
        except Exception as exn:  # tarfile, zlib, lzma, size caps: the shard counts as corrupt
            if not handler(exn):
                break


def image_pixels(data: bytes) -> int:
    """Width x height from an image's header (Pillow reads no pixel data here); 0 if it has none."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Exception:  # not an image Pillow knows: OpenCV's decode says so next
        return 0
