"""The WebAssembly i32 conformance vectors, run through the assembler and the reference
interpreter."""

from __future__ import annotations

import pytest
import wast
from conftest import conformance_cases

from tlc.runtime.machine import Status
from tlc.runtime.reference import run_program

CASES = [case for name in ("i32.wast", "address.wast", "endianness.wast")
         for case in conformance_cases(name)]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_conformance_case(case: wast.WastCase):
    result = run_program(case.program)
    if case.expected.trap is None:
        assert result.status is Status.HALTED, result
        assert result.result == case.expected.result
    else:
        assert result.status is Status.TRAPPED, result
        assert result.trap is case.expected.trap


@pytest.mark.parametrize(
    ("filename", "count"),
    [
        # i32.wast has 364 assert_return and 10 assert_trap cases; 14 use extend8_s or
        # extend16_s, which no single opcode implements.
        ("i32.wast", 364 + 10 - 14),
        # address.wast, i32 module: 74 returns, 1 trap of a 4-byte load at 65508 + 25,
        # 6 traps at address -1 and 10 traps with offset 4294967295.
        ("address.wast", 74 + 1 + 6 + 10),
        # endianness.wast: 5 i32 functions with 4 cases each.
        ("endianness.wast", 5 * 4),
    ],
)
def test_conformance_case_count(conformance_dir, filename, count):
    assert len(wast.collect_cases(conformance_dir / filename)) == count


def test_conformance_skips_only_non_i32(conformance_dir):
    for filename in ("i32.wast", "address.wast", "endianness.wast"):
        for line, reason in wast.skipped_cases(conformance_dir / filename):
            kinds = ("i64", "f32", "f64", "extend8_s", "extend16_s")
            assert any(kind in reason for kind in kinds), f"{filename}:{line}: {reason}"
