"""--model naming a GGUF file or a folder of one: which file, refusals, and the once-only atomic conversion
(the conversion itself is stubbed here; tests/real runs it on SmolLM2)."""

import hashlib
import sys

import pytest

from server import gguf_model
from server.gguf_model import GGUFError, ensure_converted, find_gguf_file
from server.model_loader import ModelNotFoundError, check_model_source, served_name


def test_a_gguf_file_or_a_folder_holding_one_names_it(tmp_path):
    (tmp_path / "one").mkdir()
    model = tmp_path / "one" / "Tiny.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    assert find_gguf_file(model) == model
    assert find_gguf_file(tmp_path / "one") == model
    assert served_name(str(model)) == "Tiny.Q4_1" and served_name(str(tmp_path / "one")) == "one"
    check_model_source(str(model))
    (tmp_path / "one" / "config.json").write_text("{}")
    assert find_gguf_file(tmp_path / "one") is None, "a transformers folder stays one"
    (tmp_path / "notes.txt").write_text("")
    assert find_gguf_file(tmp_path / "notes.txt") is None


def test_a_folder_of_several_gguf_files_and_other_files_are_refused(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\): name the one"):
        check_model_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="neither a folder .* nor a .gguf file"):
        check_model_source(str(tmp_path / "weights.bin"))


def test_missing_optional_packages_say_how_to_install_them(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(GGUFError, match=r"pip install 'pica-serve\[gguf\]'"):
        ensure_converted(model, tmp_path / "cache", progress=False)


def test_conversion_runs_once_keyed_by_the_file_hash_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF model bytes")
    calls = []

    def fake_convert(gguf_file, out_dir, progress):
        calls.append(out_dir)
        if len(calls) == 1:
            (out_dir / "partial").write_text("")
            raise RuntimeError("disk full")
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_model, "convert", fake_convert)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_converted(model, cache, progress=False)
    assert list((cache / "models").iterdir()) == [], "no half-written folder is left to be loaded"
    folder = ensure_converted(model, cache, progress=False)
    assert folder.name.startswith(f"gguf-{hashlib.sha256(model.read_bytes()).hexdigest()}")
    assert ensure_converted(model, cache, progress=False) == folder and len(calls) == 2
    model.write_bytes(b"another model")
    assert ensure_converted(model, cache, progress=False) != folder and len(calls) == 3
