"""Safe unpacking of an uploaded adapter archive (.tar.gz or .zip) into the two adapter files.

Archives are read member by member with limits: no absolute paths, no `..`, no links or special
files, a bounded number of members and bounded unpacked size. Only the two adapter files are kept
(at the top level or inside one folder); nothing is written to disk here.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import zipfile

from adapters.format import CONFIG_FILE, WEIGHTS_FILE

MAX_MEMBERS = 16


class ArchiveError(ValueError):
    """The archive is malformed or unsafe (-> 400)."""


class ArchiveTooLarge(ArchiveError):
    """The archive unpacks to more than allowed (-> 413)."""


def _check_name(name: str) -> str:
    norm = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or norm.startswith("..") or "\\" in name or ":" in name:
        raise ArchiveError(f"archive member {name!r} has an unsafe path")
    return norm


def _wanted(norm: str) -> str | None:
    base = posixpath.basename(norm)
    depth = norm.count("/")
    return base if base in (CONFIG_FILE, WEIGHTS_FILE) and depth <= 1 else None


def unpack_adapter_archive(filename: str, data: bytes, max_unpacked_bytes: int) -> dict[str, bytes]:
    """File name -> bytes for adapter_config.json and adapter_model.safetensors found in the archive."""
    lower = filename.lower()
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        members = _tar_members(data, max_unpacked_bytes)
    elif lower.endswith(".zip"):
        members = _zip_members(data, max_unpacked_bytes)
    else:
        raise ArchiveError(f"unsupported archive {filename!r}: use .tar.gz, .tgz, .tar or .zip")
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in members]
    if missing:
        raise ArchiveError(f"archive lacks {missing} (expected at its top level or inside one folder)")
    return members


def _collect(members, limit: int) -> dict[str, bytes]:
    """Apply every safety rule once. members yields (name, kind, size, read) with kind 'dir', 'file'
    or 'other' (links, devices, ...), and read() returning the member's bytes."""
    found, total = {}, 0
    for count, (name, kind, size, read) in enumerate(members, start=1):
        if count > MAX_MEMBERS:
            raise ArchiveError(f"archive has more than {MAX_MEMBERS} members")
        norm = _check_name(name)
        if kind == "dir":
            continue
        if kind != "file":
            raise ArchiveError(f"archive member {name!r} is a link or special file")
        total += size
        if total > limit:
            raise ArchiveTooLarge(f"archive unpacks to more than {limit} bytes")
        wanted = _wanted(norm)
        if wanted is not None:
            if wanted in found:
                raise ArchiveError(f"archive holds {wanted} more than once")
            found[wanted] = read()
    return found


def _tar_members(data: bytes, limit: int) -> dict[str, bytes]:
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"not a readable tar archive: {exc}") from exc
    with archive:
        return _collect(((m.name, "dir" if m.isdir() else "file" if m.isfile() else "other", m.size,
                          lambda m=m: archive.extractfile(m).read()) for m in archive), limit)


def _zip_members(data: bytes, limit: int) -> dict[str, bytes]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}") from exc

    def read(info: zipfile.ZipInfo) -> bytes:
        with archive.open(info) as f:  # read at most the declared size + 1: zip bombs lie
            payload = f.read(info.file_size + 1)
        if len(payload) > info.file_size:
            raise ArchiveError(f"archive member {info.filename!r} is larger than declared")
        return payload

    def kind(info: zipfile.ZipInfo) -> str:
        if info.is_dir():
            return "dir"
        return "other" if (info.external_attr >> 16) & 0o170000 == 0o120000 else "file"

    with archive:
        return _collect(((i.filename, kind(i), i.file_size, lambda i=i: read(i)) for i in archive.infolist()), limit)
