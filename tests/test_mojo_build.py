"""Building and caching the Mojo extension: cache location, keys, and build errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tlc.mojo import build


@pytest.fixture
def fresh_build_state(monkeypatch):
    """Forget any extension this process loaded, so each test starts from scratch."""
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_failure", None)


@pytest.fixture
def source_copy(tmp_path, monkeypatch) -> Path:
    """Point the builder at a copy of the Mojo sources that the test may edit."""
    folder = tmp_path / "sources"
    folder.mkdir()
    for path in build.SOURCE_DIR.glob("*.mojo"):
        shutil.copy(path, folder / path.name)
    monkeypatch.setattr(build, "SOURCE_DIR", folder)
    monkeypatch.setattr(build, "ROOT_SOURCE", folder / build.ROOT_SOURCE.name)
    return folder


def break_source(folder: Path) -> None:
    """Make kernels.mojo use a name that does not exist, in a function the engine calls."""
    kernels = folder / "kernels.mojo"
    text = kernels.read_text()
    assert "var best = 0" in text
    kernels.write_text(text.replace("var best = 0", "var best = undefined_name", 1))


def test_cache_dir_from_tlc_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path / "here"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_dir() == tmp_path / "here"


def test_cache_dir_from_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("TLC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_dir() == tmp_path / "xdg" / "tlc"


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("TLC_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert build.cache_dir() == tmp_path / ".cache" / "tlc"


def test_source_edit_changes_hash(source_copy):
    before = build.source_hash()
    engine = source_copy / "engine.mojo"
    engine.write_text(engine.read_text() + "\n# an edit\n")
    assert build.source_hash() != before


def test_library_lands_in_cache(monkeypatch, tmp_path, fresh_build_state):
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path))
    try:
        module = build.load_extension()
    except build.MojoCompilerMissing as error:
        pytest.skip(f"the Mojo runtime cannot be built on this machine: {error}")
    path = build.library_path()
    assert path.is_file()
    assert path.is_relative_to(tmp_path)
    assert hasattr(module, "generate")


def test_loading_keeps_child_environment(monkeypatch, tmp_path, fresh_build_state):
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path))
    try:
        build.load_extension()
    except build.MojoCompilerMissing as error:
        pytest.skip(f"the Mojo runtime cannot be built on this machine: {error}")
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('PYTHONPATH'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert child.stdout.strip() == str(os.environ.get("PYTHONPATH"))


def test_compile_error_reported(monkeypatch, tmp_path, source_copy, fresh_build_state):
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path / "cache"))
    break_source(source_copy)
    try:
        build._compiler_command()
    except build.MojoCompilerMissing as error:
        pytest.skip(f"no Mojo compiler to produce an error with: {error}")
    with pytest.raises(build.MojoBuildError) as caught:
        build.load_extension()
    message = str(caught.value)
    assert "undefined_name" in message
    assert "kernels.mojo" in message
    assert "--backend torch" in message
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_failure_remembered(monkeypatch, tmp_path, source_copy, fresh_build_state):
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path / "cache"))
    break_source(source_copy)
    try:
        build._compiler_command()
    except build.MojoCompilerMissing as error:
        pytest.skip(f"no Mojo compiler to produce an error with: {error}")
    assert build.unavailable_reason() is not None
    calls = []
    monkeypatch.setattr(build, "build", lambda *args: calls.append(args))
    assert build.is_available() is False
    assert calls == []


def test_missing_compiler_reported(monkeypatch, tmp_path, fresh_build_state):
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(build.sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(build.MojoCompilerMissing, match="Mojo compiler was not found"):
        build.load_extension()
    assert build.is_available() is False
