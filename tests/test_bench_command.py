"""Tests of `tlc bench`: the table it prints for real runs."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tlc.runtime.bench import Measurement, _measure_native, format_table

ROOT = Path(__file__).resolve().parents[1]


def test_format_table_ratios():
    rows = [
        Measurement("p.tl", "ref", 1000, 0.5, 10.0, "halted"),
        Measurement("p.tl", "torch", 1000, 5.0, 20.0, "halted"),
        Measurement("p.tl", "gcc -O2", None, 0.01, 0.0, "native"),
    ]
    lines = format_table(rows).splitlines()
    torch_row = lines[3]
    assert "| torch | 1000 |" in torch_row
    assert "| 200 |" in torch_row
    assert "0.10x" in torch_row
    assert "500x slower" in torch_row


def test_bench_runs_ref_and_gcc(tmp_path):
    source = tmp_path / "sum.tl"
    source.write_text(
        "int main(void) { int s = 0; for (int i = 0; i < 100; i++) s += i; return s & 255; }\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "tlc", "bench", str(source), "--backends", "ref"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    ref_rows = [line for line in completed.stdout.splitlines() if "| ref |" in line]
    native_rows = [line for line in completed.stdout.splitlines() if "| gcc -O2 |" in line]
    assert len(ref_rows) == 1
    assert "halted" in ref_rows[0]
    assert len(native_rows) == 1
    assert "native" in native_rows[0]


def _bench(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlc", "bench", *arguments],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip


def test_bench_rejects_zero_batch():
    completed = _bench("examples/countdown.tasm", "--batch", "0")
    assert completed.returncode == 2
    assert "--batch must be between 1 and" in completed.stderr
    assert completed.stdout == ""


def test_bench_rejects_unknown_backend():
    completed = _bench("examples/countdown.tasm", "--backends", "ref,foo")
    assert completed.returncode == 2
    assert "unknown backend foo" in completed.stderr


def test_bench_checks_every_program_first():
    completed = _bench("examples/countdown.tasm", "examples/missing.tl", "--backends", "ref")
    assert completed.returncode == 2
    assert "not found: examples/missing.tl" in completed.stderr
    assert completed.stdout == ""


def test_bench_shows_compile_error_line(tmp_path):
    source = tmp_path / "bad.tl"
    source.write_text("int main(void) { return x; }\n")
    completed = _bench(str(source), "--backends", "ref")
    assert completed.returncode == 1
    row = next(line for line in completed.stdout.splitlines() if "| ref |" in line)
    assert "'x' undeclared" in row
    assert "CompileError" not in row


def test_format_table_small_ratio():
    rows = [
        Measurement("p.tl", "ref", 1_000_000, 0.5, 10.0, "halted"),
        Measurement("p.tl", "torch", 1_000_000, 500.0, 20.0, "halted"),
    ]
    torch_row = format_table(rows).splitlines()[3]
    assert "| 0.001x |" in torch_row


def test_bench_stops_native_run_that_never_ends(tmp_path, monkeypatch):
    from tlc.runtime import bench

    source = tmp_path / "loop.tl"
    source.write_text("int main(void) { while (1) {} return 0; }\n")
    monkeypatch.setattr(bench, "NATIVE_TIMEOUT_SECONDS", 1)
    row = bench._measure_native(source)
    assert row.status == "error: timed out after 1 s"


def test_bench_rejects_empty_backend_name():
    completed = _bench("examples/countdown.tasm", "--backends", "ref,,ref")
    assert completed.returncode == 2
    assert "has an empty name" in completed.stderr


def test_bench_programs_reports_bad_files(tmp_path):
    broken = tmp_path / "broken.tl"
    broken.write_text("int main( {\n")
    for path, message in ((tmp_path / "absent.tl", "file not found"), (broken, "broken.tl:1:")):
        completed = subprocess.run(
            [sys.executable, "-m", "tlc.mojo.bench_programs", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert completed.returncode == 1
        assert message in completed.stderr
        assert "Traceback" not in completed.stderr


def test_format_table_native_faster_than_ref():
    rows = [
        Measurement("p.tl", "ref", 10, 0.001, 10.0, "halted"),
        Measurement("p.tl", "torch", 10, 0.0028, 10.0, "halted"),
        Measurement("p.tl", "gcc -O2", None, 0.002, 0.0, "native"),
    ]
    lines = format_table(rows).splitlines()
    assert "| 2.0x faster |" in lines[2]
    assert "| 1.4x slower |" in lines[3]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="integer division by zero raises SIGFPE on x86 only")
def test_native_run_names_its_signal(tmp_path):
    source = tmp_path / "divide.tl"
    source.write_text("#include <stdio.h>\n"
                      "int main(void) { int zero = getchar() - 'a'; return 7 / zero; }\n")
    source.with_suffix(".in").write_bytes(b"a")
    measured = _measure_native(source)
    assert measured.status == "native, killed by SIGFPE"
