"""Safe unpacking of an uploaded adapter archive (.tar.gz or .zip) into the two adapter files.

Archives are read member by member, streaming, with limits: no absolute paths, no `..`, no links
or special files, at most MAX_MEMBERS members, a bound on the bytes they unpack to, and a bound on
each adapter file, checked before it is read. Only the two adapter files are kept; nothing is
written to disk here, so the memory used is at most those two files.

Where the adapter is: both files at the top level (`cd DIR && tar czf ../a.tgz .`; `./` prefixes
are fine), else both inside one top folder (`tar czf a.tgz DIR`, `zip -r a.zip DIR`). Anything
else (a README, `checkpoint-N/` folders, `__MACOSX/`) is ignored. Refused as ambiguous: adapter
files in several top folders with none at the top level, the two files in two different places,
and one path twice.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
import zipfile
import zlib
from typing import BinaryIO

from adapters.format import CONFIG_FILE, WEIGHTS_FILE

MAX_MEMBERS = 256
MAX_CONFIG_BYTES = 2**20
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# what a damaged archive raises while it is read: truncation, bad CRC, corrupt deflate data, ...
READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
               RuntimeError)


class ArchiveError(ValueError):
    """The archive is malformed or unsafe (-> 400)."""


class ArchiveTooLarge(ArchiveError):
    """The archive unpacks to more than allowed (-> 413)."""


def _check_name(name: str) -> str:
    norm = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or norm.startswith("..") or "\\" in name or ":" in name:
        raise ArchiveError(f"archive member {name!r} has an unsafe path")
    return norm


class _Collector:
    """Applies every rule once, member by member, and keeps only the adapter files that may be chosen."""

    def __init__(self, max_unpacked_bytes: int, max_weights_bytes: int):
        self.max_unpacked_bytes = max_unpacked_bytes
        self.max_file_bytes = {CONFIG_FILE: MAX_CONFIG_BYTES, WEIGHTS_FILE: max_weights_bytes}
        self.count = self.total = 0
        self.seen: set[str] = set()
        self.top: dict[str, bytes] = {}
        self.folder: str | None = None  # the first top folder holding an adapter file
        self.in_folder: dict[str, bytes] = {}
        self.other_folders: set[str] = set()

    def add(self, name: str, kind: str, size: int, read) -> None:
        """kind is 'dir', 'file' or 'other' (links, devices, ...); read(limit) returns the member's bytes."""
        self.count += 1
        if self.count > MAX_MEMBERS:
            raise ArchiveError(f"archive has more than {MAX_MEMBERS} members")
        norm = _check_name(name)
        if kind == "dir":
            return
        if kind != "file":
            raise ArchiveError(f"archive member {name!r} is a link or special file")
        if norm in self.seen:
            raise ArchiveError(f"archive holds {norm} more than once")
        self.seen.add(norm)
        self.total += size
        if self.total > self.max_unpacked_bytes:
            raise ArchiveTooLarge(f"archive unpacks to more than {self.max_unpacked_bytes} bytes")
        folder, base = posixpath.split(norm)
        if base not in ADAPTER_FILES or "/" in folder:
            return  # deeper files (checkpoints) and other files are ignored
        limit = self.max_file_bytes[base]
        if size > limit:
            raise ArchiveTooLarge(f"{norm} is {size} bytes, more than this server accepts ({limit} bytes)")
        if not folder:
            self.top[base] = read(limit)
        elif self.folder in (None, folder):
            self.folder = folder
            self.in_folder[base] = read(limit)
        else:
            self.other_folders.add(folder)

    def result(self) -> dict[str, bytes]:
        if len(self.top) == len(ADAPTER_FILES):
            return self.top
        if self.top and self.in_folder:
            raise ArchiveError(f"archive holds {sorted(self.top)} at its top level and {sorted(self.in_folder)} in "
                               f"{self.folder}/: put both adapter files in the same place")
        if self.other_folders:
            folders = sorted({self.folder, *self.other_folders})
            raise ArchiveError(f"archive holds adapter files in several folders {folders}: archive one adapter folder")
        found = self.top or self.in_folder
        missing = [n for n in ADAPTER_FILES if n not in found]
        if missing:
            raise ArchiveError(f"archive lacks {missing} (expected at its top level or inside one folder)")
        return found


def unpack_adapter_archive(filename: str, fileobj: BinaryIO, max_unpacked_bytes: int,
                           max_weights_bytes: int) -> dict[str, bytes]:
    """File name -> bytes for adapter_config.json and adapter_model.safetensors found in the archive.

    fileobj is the uploaded archive (seekable; a spooled temporary file). Blocking: call it off the
    event loop."""
    lower = filename.lower()
    collector = _Collector(max_unpacked_bytes, max_weights_bytes)
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        read_members, kind = _tar_members, "tar"
    elif lower.endswith(".zip"):
        read_members, kind = _zip_members, "zip"
    else:
        raise ArchiveError(f"unsupported archive {filename!r}: use .tar.gz, .tgz, .tar or .zip")
    try:
        read_members(fileobj, collector)
    except ArchiveError:
        raise
    except READ_ERRORS as exc:
        raise ArchiveError(f"not a readable {kind} archive: {type(exc).__name__}: {exc}") from exc
    return collector.result()


class _BoundedReader:
    """A read-only stream that refuses to yield more than `limit` bytes: gzip bombs stop here."""

    def __init__(self, raw: BinaryIO, limit: int):
        self.raw, self.limit, self.num_read = raw, limit, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.num_read += len(data)
        if self.num_read > self.limit:
            raise ArchiveTooLarge(f"archive unpacks to more than {self.limit} bytes")
        return data


def _tar_members(fileobj: BinaryIO, collector: _Collector) -> None:
    fileobj.seek(0)
    magic = fileobj.read(2)
    fileobj.seek(0)
    raw = gzip.GzipFile(fileobj=fileobj, mode="rb") if magic == b"\x1f\x8b" else fileobj
    # headers and padding come on top of the members' bytes: allow them a little room
    stream = _BoundedReader(raw, collector.max_unpacked_bytes + 1024 * (MAX_MEMBERS + 2))
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for m in archive:
            kind = "dir" if m.isdir() else "file" if m.isfile() else "other"
            collector.add(m.name, kind, m.size, lambda limit, m=m: archive.extractfile(m).read(limit))


def _zip_members(fileobj: BinaryIO, collector: _Collector) -> None:
    fileobj.seek(0)
    with zipfile.ZipFile(fileobj) as archive:

        def read(info: zipfile.ZipInfo, limit: int) -> bytes:
            with archive.open(info) as f:  # read at most the declared size + 1: zip bombs lie
                payload = f.read(min(info.file_size, limit) + 1)
            if len(payload) > info.file_size:
                raise ArchiveError(f"archive member {info.filename!r} is larger than declared")
            return payload

        def kind(info: zipfile.ZipInfo) -> str:
            if info.is_dir():
                return "dir"
            return "other" if (info.external_attr >> 16) & 0o170000 == 0o120000 else "file"

        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ArchiveError(f"archive has more than {MAX_MEMBERS} members")
        for info in infos:
            collector.add(info.filename, kind(info), info.file_size, lambda limit, i=info: read(i, limit))
