"""The example and benchmark `.tasm` programs run to their known results."""

from __future__ import annotations

import pytest
from conftest import REPOSITORY

from tlc.compiler.assembler import assemble
from tlc.runtime.machine import Status
from tlc.runtime.reference import run_program

# (path, stdin, expected stdout, expected result)
PROGRAMS = [
    ("examples/countdown.tasm", b"", b"5\n4\n3\n2\n1\n", 0),
    ("examples/hello.tasm", b"", b"Hello, world!\n", None),
    ("examples/upcase.tasm", b"tlc {x}\n", b"TLC {X}\n", 0),
    ("examples/factorial.tasm", b"", b"", 5 * 4 * 3 * 2),
    # 3000 outer iterations, each adding 0 + 1 + ... + 99 = 4950.
    ("benchmarks/nested_loops.tasm", b"", b"", 3000 * 4950),
    # fibonacci(24), with fibonacci(0) = 0 and fibonacci(1) = 1.
    ("benchmarks/fibonacci.tasm", b"", b"", 46368),
]


@pytest.mark.parametrize(("path", "stdin", "output", "result"), PROGRAMS)
def test_program_result(path, stdin, output, result):
    program = assemble((REPOSITORY / path).read_text(), path)
    outcome = run_program(program, stdin=stdin)
    assert outcome.status is Status.HALTED
    assert outcome.output == output
    assert outcome.result == result
