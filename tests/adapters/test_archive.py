"""Archives of an adapter folder made the usual ways unpack; ambiguous, damaged or oversized ones are refused."""

import io
import shutil
import struct
import subprocess
import tarfile
import zipfile

import pytest

from adapters.archive import ArchiveError, ArchiveTooLarge, unpack_adapter_archive
from tests.helpers import tar_gz

FILES = {"adapter_config.json": b'{"method": "pica"}', "adapter_model.safetensors": b"w" * 100}
LIMIT = 10 * 2**20


def unpack(name: str, data: bytes, max_unpacked=LIMIT, max_weights=LIMIT):
    return unpack_adapter_archive(name, io.BytesIO(data), max_unpacked, max_weights)


def trained_folder(root):
    """What `pica-serve train` used to leave: the adapter plus checkpoint folders (more than 16 files)."""
    folder = root / "my-adapter"
    for sub in ["", *(f"checkpoint-{n}" for n in range(1, 6))]:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for name, data in FILES.items():
            (folder / sub / name).write_bytes(data + sub.encode())
        if sub:
            (folder / sub / "trainer_state.json").write_text("{}")
    (folder / "README.md").write_text("notes")
    return folder


def zip_of(members: dict, compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("command,name", [
    ("tar czf {out} my-adapter", "a.tar.gz"),
    ("cd my-adapter && tar czf {out} .", "a.tgz"),
    ("cd my-adapter && tar czf {out} *", "a.tgz"),
    ("tar cf {out} my-adapter", "a.tar"),
    ("zip -qr {out} my-adapter", "a.zip"),
    ("cd my-adapter && zip -qr {out} .", "a.zip"),
])
def test_archives_made_the_usual_ways_unpack(tmp_path, command, name):
    tool = command.split("&&")[-1].split()[0]
    if shutil.which(tool) is None:
        pytest.skip(f"no {tool} here")
    trained_folder(tmp_path)
    out = tmp_path / name
    subprocess.run(command.format(out=out), shell=True, cwd=tmp_path, check=True)
    assert unpack(name, out.read_bytes()) == FILES  # the top folder's files, not a checkpoint's


def test_dot_prefixes_and_ignorable_members():
    members = {"./adapter_config.json": FILES["adapter_config.json"], "./adapter_model.safetensors": b"w" * 100,
               "./checkpoint-3/adapter_config.json": b"{}", "__MACOSX/._adapter_config.json": b"x"}
    assert unpack("a.tar.gz", tar_gz(members)) == FILES
    assert unpack("a.zip", zip_of(members)) == FILES


@pytest.mark.parametrize("members,message", [
    ({"a/adapter_config.json": b"{}", "b/adapter_model.safetensors": b"w"}, "several folders"),
    ({"adapter_config.json": b"{}", "b/adapter_model.safetensors": b"w"}, "put both adapter files in the same place"),
    ({**{f"a/{k}": v for k, v in FILES.items()}, **{f"b/{k}": v for k, v in FILES.items()}}, "several folders"),
    ({"adapter_config.json": b"{}"}, "archive lacks ['adapter_model.safetensors']"),
])
def test_ambiguous_archives_are_refused(members, message):
    for name, data in (("a.tar.gz", tar_gz(members)), ("a.zip", zip_of(members))):
        with pytest.raises(ArchiveError, match=message.replace("[", r"\[").replace("]", r"\]")):
            unpack(name, data)


def test_a_path_twice_is_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for data in (b"{}", b"{} "):
            info = tarfile.TarInfo("adapter_config.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="more than once"):
        unpack("a.tgz", buf.getvalue())


def damaged_zips() -> dict[str, bytes]:
    stored = bytearray(zip_of(FILES))
    data_at = stored.index(b"w" * 100)
    stored[data_at] ^= 0xFF  # bad CRC
    deflated = bytearray(zip_of({**FILES, "adapter_model.safetensors": bytes(range(256)) * 40}, zipfile.ZIP_DEFLATED))
    cd = deflated.index(b"PK\x01\x02")
    corrupt = bytearray(deflated)
    corrupt[60:120] = b"\xff" * 60  # corrupt deflate stream
    lying = bytearray(deflated)
    second = lying.index(b"PK\x01\x02", cd + 1)
    struct.pack_into("<I", lying, second + 24, 10)  # declares 10 bytes, inflates to 10240
    return {"bad crc": bytes(stored), "corrupt deflate": bytes(corrupt), "inflates past its size": bytes(lying)}


@pytest.mark.parametrize("case", ["bad crc", "corrupt deflate", "inflates past its size"])
def test_damaged_zips_are_archive_errors(case):
    with pytest.raises(ArchiveError):
        unpack("a.zip", damaged_zips()[case])


def test_truncated_tar_gz_is_an_archive_error():
    data = tar_gz({**FILES, "adapter_model.safetensors": bytes(range(256)) * 400})
    with pytest.raises(ArchiveError, match="not a readable tar archive"):
        unpack("a.tar.gz", data[: len(data) // 2])


def test_an_oversized_adapter_file_is_refused_before_it_is_read():
    big = {**FILES, "adapter_model.safetensors": bytes(2**20)}
    for name, data in (("a.tar.gz", tar_gz(big)), ("a.zip", zip_of(big, zipfile.ZIP_DEFLATED))):
        with pytest.raises(ArchiveTooLarge, match="more than this server accepts"):
            unpack(name, data, max_weights=1000)


def test_unpacked_size_is_bounded_while_streaming():
    bomb = tar_gz({"padding.bin": bytes(4 * 2**20), **FILES})  # compresses to a few KiB
    assert len(bomb) < 64 * 2**10
    with pytest.raises(ArchiveTooLarge, match="unpacks to more than"):
        unpack("a.tar.gz", bomb, max_unpacked=2**20)


def test_many_members_are_refused():
    with pytest.raises(ArchiveError, match="more than 256 members"):
        unpack("a.zip", zip_of({f"x{i}": b"" for i in range(300)}))
