"""`tlc build` and `tlc inspect` through the real command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
