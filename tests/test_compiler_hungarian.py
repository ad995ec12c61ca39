"""examples/hungarian.tl finds the same minimum cost as scipy's linear_sum_assignment."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from tlc.compiler.driver import compile_file
from tlc.runtime.machine import Status
from tlc.runtime.reference import run_program

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hungarian.tl"
SIZE = 10


def cost_matrix() -> np.ndarray:
    """Read the cost matrix from the initializer of `cost` in the example's source."""
    source = EXAMPLE.read_text()
    body = re.search(r"int cost\[N\]\[N\] = \{(.*?)\};", source, re.DOTALL).group(1)
    numbers = [int(n) for n in re.findall(r"-?\d+", body)]
    assert len(numbers) == SIZE * SIZE
    return np.array(numbers).reshape(SIZE, SIZE)


def run_example() -> str:
    result = run_program(compile_file(EXAMPLE))
    assert result.status is Status.HALTED
    return result.output.decode()


def test_minimum_cost_matches_scipy():
    costs = cost_matrix()
    rows, columns = linear_sum_assignment(costs)
    expected = int(costs[rows, columns].sum())
    reported = int(re.search(r"minimum cost: (-?\d+)", run_example()).group(1))
    assert reported == expected


def test_assignment_is_a_permutation_with_that_cost():
    costs = cost_matrix()
    output = run_example()
    pairs = [(int(r), int(c)) for r, c in re.findall(r"row (\d+) -> column (\d+)", output)]
    assert sorted(r for r, _ in pairs) == list(range(SIZE))
    assert sorted(c for _, c in pairs) == list(range(SIZE))
    reported = int(re.search(r"minimum cost: (-?\d+)", output).group(1))
    assert sum(int(costs[r, c]) for r, c in pairs) == reported
