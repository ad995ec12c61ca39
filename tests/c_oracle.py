"""gcc as the oracle for .tl programs: build a file with gcc -fwrapv and run it.

A .tl program is a C program, so gcc with the real libc gives the expected output and
exit status. `-fwrapv` makes signed overflow wrap as on the 55-opcode machine, and
`-fsigned-char` makes char signed as in tlc on every host.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

GCC_FLAGS = ["-std=gnu11", "-fwrapv", "-fsigned-char", "-w", "-O1", "-x", "c"]
RUN_TIMEOUT_SECONDS = 20


@dataclass(frozen=True)
class NativeRun:
    output: bytes
    exit_status: int


def require_gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed; the differential tests need it as the oracle")
    return gcc


def run_with_gcc(source: Path, work_dir: Path, stdin: bytes = b"") -> NativeRun:
    """Compile `source` with gcc into `work_dir` and run it; fail the test if gcc fails."""
    gcc = require_gcc()
    executable = work_dir / (source.stem + ".native")
    build = subprocess.run([gcc, *GCC_FLAGS, str(source), "-o", str(executable)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"gcc rejected {source}:\n{build.stderr}")
    run = subprocess.run([str(executable)], input=stdin, capture_output=True,
                         timeout=RUN_TIMEOUT_SECONDS)
    return NativeRun(run.stdout, run.returncode)
