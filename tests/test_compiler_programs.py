"""Differential tests: every example and every program of tests/programs, compiled by tlc
and run on the reference interpreter, prints what gcc's build prints and exits the same.

A program `NAME.tl` reads `NAME.in` as stdin when that file exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from c_oracle import run_with_gcc

from tlc.compiler.driver import compile_file
from tlc.runtime.machine import Status
from tlc.runtime.reference import run_program

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPOSITORY / "examples").glob("*.tl"))
CORPUS = sorted((REPOSITORY / "tests" / "programs").glob("*.tl"))
MAX_STEPS = 20_000_000
# The model backends are slower than the reference interpreter, so the two showcase
# examples must stay well below this many executed instructions.
SHOWCASE_STEP_BUDGET = 5_000_000


def _stdin_of(path: Path) -> bytes:
    input_path = path.with_suffix(".in")
    return input_path.read_bytes() if input_path.exists() else b""


def _run_tlc(path: Path):
    program = compile_file(path)
    return program, run_program(program, stdin=_stdin_of(path), max_steps=MAX_STEPS)


@pytest.mark.parametrize("path", EXAMPLES + CORPUS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_program_matches_gcc(path: Path, tmp_path: Path):
    native = run_with_gcc(path, tmp_path, _stdin_of(path))
    _, result = _run_tlc(path)
    assert result.status is Status.HALTED, f"{path.name}: {result.status} {result.trap}"
    assert result.output.decode("latin-1") == native.output.decode("latin-1")
    assert result.exit_status == native.exit_status


@pytest.mark.parametrize("name", ["hungarian.tl", "sudoku.tl"])
def test_showcase_step_count(name: str):
    _, result = _run_tlc(REPOSITORY / "examples" / name)
    assert result.status is Status.HALTED
    assert result.steps < SHOWCASE_STEP_BUDGET


def test_examples_exist():
    names = {path.name for path in EXAMPLES}
    expected = {"hungarian.tl", "sudoku.tl", "fibonacci.tl", "primes.tl", "collatz.tl",
                "nqueens.tl", "quicksort.tl", "strings.tl"}
    assert expected <= names


def test_reads_input_only_with_getchar():
    echo, _ = _run_tlc(REPOSITORY / "tests" / "programs" / "input_echo.tl")
    hungarian, _ = _run_tlc(REPOSITORY / "examples" / "hungarian.tl")
    assert echo.reads_input is True
    assert hungarian.reads_input is False


def test_instructions_carry_source_lines():
    program = compile_file(REPOSITORY / "examples" / "fibonacci.tl")
    lines = {instruction.line for instruction in program.instructions}
    source_lines = len((REPOSITORY / "examples" / "fibonacci.tl").read_text().splitlines())
    known = {line for line in lines if line is not None}
    assert known
    assert max(known) <= source_lines
