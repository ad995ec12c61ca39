"""Compiled .tl programs run inside the model (PyTorch runtime) with the same trace,
output and result as on the reference interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_helpers import first_difference, outcome, run_both

from tlc.cli import load_program
from tlc.runtime import torch_runner

PROGRAMS = Path(__file__).resolve().parent / "programs"
QUICK = ["input_echo.tl", "exit_status.tl", "functions.tl"]
LONGER = ["statements_misc.tl", "precedence.tl", "pointers_arrays.tl", "expressions.tl",
          "initializers.tl", "control.tl", "strings_stdlib.tl", "recursion.tl",
          "conversions.tl"]  # fmt: skip


def _check(name: str) -> None:
    path = PROGRAMS / name
    program = load_program(str(path))
    stdin_path = path.with_suffix(".in")
    stdin = stdin_path.read_bytes() if stdin_path.exists() else b""
    (expected, expected_trace), (actual, trace) = run_both(
        torch_runner.run_program, program, stdin, 100_000
    )
    assert trace == expected_trace, first_difference(expected_trace, trace)
    assert outcome(actual) == outcome(expected)


@pytest.mark.parametrize("name", QUICK)
def test_compiled_program_in_torch(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LONGER)
def test_longer_compiled_program_in_torch(name):
    _check(name)
