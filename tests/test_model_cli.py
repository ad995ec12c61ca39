"""`tlc build` and `tlc inspect` through the real command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _tlc(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlc", *arguments], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_build_inspect_and_run(tmp_path):
    weights = tmp_path / "hello.safetensors"
    built = _tlc("build", str(EXAMPLES / "hello.tasm"), "-o", str(weights))
    assert built.returncode == 0, built.stderr
    assert weights.stat().st_size > 0

    inspected = _tlc("inspect", str(weights))
    assert inspected.returncode == 0, inspected.stderr
    assert "exactness certificate" in inspected.stdout
    assert "passed" in inspected.stdout
    assert "head 0 fetch (exact" in inspected.stdout
    assert "computes 55 of 55 opcodes" in inspected.stdout
    assert "program: hello.tasm" in inspected.stdout.replace(str(EXAMPLES) + "/", "")

    ran = _tlc("run", "--backend", "torch", "--weights", str(weights),
               str(EXAMPLES / "hello.tasm"))  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "Hello, world!\n"


def test_inspect_rejects_other_files(tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a weight file")
    inspected = _tlc("inspect", str(bogus))
    assert inspected.returncode == 2
    assert "cannot read the weight file" in inspected.stderr
    assert "Traceback" not in inspected.stderr


def _built(tmp_path) -> Path:
    weights = tmp_path / "factorial.safetensors"
    built = _tlc("build", str(EXAMPLES / "factorial.tasm"), "-o", str(weights))
    assert built.returncode == 0, built.stderr
    return weights


@pytest.mark.parametrize("backend", ["torch", "mojo"])
def test_run_rejects_edited_weights(tmp_path, backend):
    if backend == "mojo":
        from tlc.mojo import runner

        if not runner.is_available():
            pytest.skip("the Mojo runtime is not available on this machine")
    weights = _built(tmp_path)
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40  # a bit of the last tensor's data
    weights.write_bytes(bytes(data))
    ran = _tlc("run", "--backend", backend, "--weights", str(weights),
               str(EXAMPLES / "factorial.tasm"))  # fmt: skip
    assert ran.returncode == 2
    assert f"{weights}: the tensors or the metadata do not match" in ran.stderr
    assert "tlc build" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_run_rejects_missing_weights(tmp_path):
    ran = _tlc("run", "--backend", "torch", "--weights", str(tmp_path / "none.safetensors"),
               str(EXAMPLES / "factorial.tasm"))  # fmt: skip
    assert ran.returncode == 2
    assert "none.safetensors: cannot read the weight file" in ran.stderr


def test_build_rejects_missing_folder(tmp_path):
    output = tmp_path / "missing" / "w.safetensors"
    built = _tlc("build", str(EXAMPLES / "factorial.tasm"), "-o", str(output))
    assert built.returncode == 2
    assert "is not an existing folder" in built.stderr
    assert not output.exists()


def test_build_rejects_folder_output(tmp_path):
    built = _tlc("build", str(EXAMPLES / "factorial.tasm"), "-o", str(tmp_path))
    assert built.returncode == 2
    assert "not a regular file" in built.stderr
    assert tmp_path.is_dir()


def test_build_output_mode_follows_umask(tmp_path):
    weights = _built(tmp_path)
    assert weights.stat().st_mode & 0o077 == 0o666 & ~_umask() & 0o077


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current


def test_build_refuses_to_overwrite_source(tmp_path):
    source = tmp_path / "factorial.tasm"
    text = (EXAMPLES / "factorial.tasm").read_text()
    source.write_text(text)
    built = _tlc("build", str(source), "-o", str(source))
    assert built.returncode == 2
    assert "the program's source file" in built.stderr
    assert source.read_text() == text


def test_build_rejects_trailing_separator(tmp_path):
    output = f"{tmp_path}/w.safetensors/"
    built = _tlc("build", str(EXAMPLES / "factorial.tasm"), "-o", output)
    assert built.returncode == 2
    assert "ends with a folder separator" in built.stderr


@pytest.mark.parametrize("backend", ["torch", "mojo", "inspect"])
@pytest.mark.parametrize("edit", ["width", "kind", "vocab", "vocab type", "layers", "experts",
                                  "heads type", "format"])
def test_run_rejects_inconsistent_signed_weights(tmp_path, backend, edit):
    # Files with a valid checksum whose metadata does not match the tensors.
    from tlc.model.weights import load_weights, write_weight_file

    if backend == "mojo":
        from tlc.mojo import runner

        if not runner.is_available():
            pytest.skip("the Mojo runtime is not available on this machine")
    if backend == "inspect" and edit == "kind":
        pytest.skip("inspect does not read the token schema, which a run checks")
    weights = _built(tmp_path)
    tensors, metadata = load_weights(weights)
    if edit == "width":
        metadata["D"] = metadata["D"] + 7
    elif edit == "kind":
        metadata["kind"] = "RUN"
    elif edit == "vocab":
        metadata["fields"][0]["vocab"] = 1
    elif edit == "vocab type":
        metadata["fields"][0]["vocab"] = None
    elif edit == "heads type":
        metadata["layers"][0]["heads"] = len(metadata["layers"][0]["heads"])
    elif edit == "layers":
        metadata["layers"] = []
    elif edit == "format":
        metadata["format"] = "tlc-weights-1"  # the token layout before key bits
    else:
        metadata["layers"][0]["experts"].pop()
    write_weight_file(weights, tensors, metadata)
    if backend == "inspect":
        ran = _tlc("inspect", str(weights))
    else:
        ran = _tlc("run", "--backend", backend, "--weights", str(weights),
                   str(EXAMPLES / "factorial.tasm"))  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert str(weights) in ran.stderr
    assert "internal error" not in ran.stderr
    if edit == "format":
        assert "weight format 'tlc-weights-1', expected 'tlc-weights-2'" in ran.stderr
