"""The WebAssembly i32, address and endianness vectors run inside the model by the
PyTorch runtime. Each case must give the expected result or trap and the same trace as
the reference interpreter."""

from __future__ import annotations

import pytest
import wast
from conftest import conformance_cases
from model_helpers import first_difference, run_both

from tlc.model.weights import uncovered_opcodes
from tlc.runtime import torch_runner
from tlc.runtime.machine import Status

CASES = [case for name in ("i32.wast", "address.wast", "endianness.wast")
         for case in conformance_cases(name)]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_torch_conformance_case(case: wast.WastCase):
    missing = uncovered_opcodes(torch_runner.load_model().metadata, case.program)
    if missing:
        pytest.skip(f"the model does not compute {', '.join(missing)} yet")
    (_, expected_trace), (result, trace) = run_both(torch_runner.run_program, case.program)
    assert trace == expected_trace, first_difference(expected_trace, trace)
    if case.expected.trap is None:
        assert result.status is Status.HALTED, result
        assert result.result == case.expected.result
    else:
        assert result.status is Status.TRAPPED, result
        assert result.trap is case.expected.trap
