"""Batched execution: `run_batch` decodes several programs in lockstep, one column of
the activation each, and every program's trace and result equal the reference
interpreter's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_helpers import first_difference, outcome
from test_torch_programs import PROGRAMS, TRAPS
from test_torch_random import programs as random_programs

from tlc.compiler.assembler import assemble
from tlc.compiler.driver import compile_source
from tlc.runtime import reference, torch_runner

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 300


def _reference(program, stdin: bytes, max_steps: int):
    trace: list[str] = []
    result = reference.run_program(program, stdin=stdin, max_steps=max_steps,
                                   trace=trace.append)  # fmt: skip
    return result, trace


def _check_batch(programs, stdins, max_steps: int = MAX_STEPS) -> None:
    traces: list[list[str]] = [[] for _ in programs]
    results = torch_runner.run_batch(programs, stdins, max_steps=max_steps,
                                     traces=[t.append for t in traces])  # fmt: skip
    assert len(results) == len(programs)
    for program, stdin, result, trace in zip(programs, stdins, results, traces):
        expected, expected_trace = _reference(program, stdin, max_steps)
        assert trace == expected_trace, first_difference(expected_trace, trace)
        assert outcome(result) == outcome(expected)


def test_batch_of_different_programs_and_lengths():
    sources = list(PROGRAMS.values()) + [source for source, _ in TRAPS.values()]
    programs = [assemble(source, "t.tasm") for source in sources]
    stdins = [bytes([65 + i % 26]) * (i % 4) for i in range(len(programs))]
    _check_batch(programs, stdins, max_steps=2000)


def test_one_program_on_many_inputs():
    program = compile_source(
        "#include <stdio.h>\n"
        "int main(void) { int c; int n = 0; while ((c = getchar()) != -1) {"
        " if (c >= 'a' && c <= 'z') c -= 32; putchar(c); n++; } return n; }\n",
        "upcase.tl",
    )
    stdins = [b"", b"a", b"hello", b"MiXeD 123", b"zz" * 10]
    _check_batch([program] * len(stdins), stdins, max_steps=5000)


def test_batch_step_limit_stops_every_program():
    program = assemble("loop: PUSH 1\nJNZ loop", "t.tasm")
    results = torch_runner.run_batch([program] * 3, max_steps=7)
    assert [r.steps for r in results] == [7, 7, 7]
    assert len({r.status for r in results}) == 1


def test_batch_rejects_mismatched_inputs():
    program = assemble("HALT", "t.tasm")
    with pytest.raises(ValueError, match="2 programs but 1 inputs"):
        torch_runner.run_batch([program, program], [b""])


def test_batch_checks_inputs_and_step_limit():
    program = assemble("HALT", "t.tasm")
    with pytest.raises(TypeError, match="stdin must be bytes, not str"):
        torch_runner.run_batch([program, program], [b"", "x"])
    with pytest.raises(ValueError, match="max_steps must be 0 or more"):
        torch_runner.run_batch([program], max_steps=-1)


def test_empty_batch():
    assert torch_runner.run_batch([]) == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(random_programs(), st.binary(max_size=4)), min_size=2, max_size=5))
def test_random_programs_in_one_batch(cases):
    _check_batch([program for program, _ in cases], [stdin for _, stdin in cases])


def test_bench_batch_row(tmp_path):
    source = tmp_path / "sum.tl"
    source.write_text(
        "int main(void) { int s = 0; for (int i = 0; i < 20; i++) s += i; return s & 255; }\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "tlc", "bench", str(source), "--backends", "ref",
         "--batch", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    ref_steps = int(next(line for line in lines if "| ref |" in line).split("|")[3])
    batch_row = next(line for line in lines if "| torch x3 |" in line)
    assert int(batch_row.split("|")[3]) == 3 * ref_steps
    assert "halted" in batch_row


def _cache_contents(batch, program: int) -> list:
    """Every head's (key, value, position) entries of one program, in slot order."""
    contents = []
    for layer in batch.caches:
        for cache in layer:
            size = cache.sizes[program]
            contents.append((cache.keys[program, :size].tolist(),
                             cache.values[program, :size].tolist(),
                             cache.positions[program, :size].tolist()))  # fmt: skip
    return contents


def test_prefill_appending_matches_full_layers():
    from tlc.model import tokens as tk

    model = torch_runner.load_model()
    assert model.token_keys
    sources = [PROGRAMS["data-segments"], PROGRAMS["locals-per-frame"], PROGRAMS["stdin-and-eof"]]
    programs = [assemble(source, "t.tasm") for source in sources]
    prompts = [tk.encode_prompt(model.metadata, p, b"xyz") for p in programs]
    appended = torch_runner.Batch(model.layers, len(prompts))
    layered = torch_runner.Batch(model.layers, len(prompts))
    with torch_runner._OneThread():
        fast = model.prefill_many(appended, prompts)
        full = model._prefill_layers(layered, prompts)
        assert (fast == full).all()
        assert appended.positions == layered.positions
        for program in range(len(prompts)):
            assert _cache_contents(appended, program) == _cache_contents(layered, program)
        for _ in range(5):
            fast = model.step_many(appended, list(range(len(prompts))), fast)
            full = model.step_many(layered, list(range(len(prompts))), full)
            assert (fast == full).all()


def _torch_speed(*options: str) -> subprocess.CompletedProcess:
    """Run benchmarks/torch_speed.py on examples/countdown.tasm with `options`."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "torch_speed.py"),
         str(ROOT / "examples" / "countdown.tasm"), *options],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_torch_speed_benchmark_rows():
    completed = _torch_speed("--batch", "1,3")
    assert completed.returncode == 0, completed.stderr
    rows = [line.split("|") for line in completed.stdout.splitlines()
            if line.startswith("| countdown.tasm")]  # fmt: skip
    steps = reference.run_program(assemble((ROOT / "examples" / "countdown.tasm").read_text(),
                                           "countdown.tasm")).steps  # fmt: skip
    assert [int(row[2]) for row in rows] == [1, 3]
    assert [int(row[3].replace(",", "")) for row in rows] == [steps, 3 * steps]


def test_torch_speed_rejects_bad_batch():
    completed = _torch_speed("--batch", "0")
    assert completed.returncode == 2
    assert "at least 1" in completed.stderr
