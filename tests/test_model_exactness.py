"""Exactness: long runs stay equal to the reference, and float32 could not hold the values
the model computes (the float64 certificate is what makes the runs exact)."""

from __future__ import annotations

import numpy as np
import pytest
from model_helpers import first_difference, outcome, run_both

from tlc.compiler.assembler import assemble
from tlc.model import tokens as tk
from tlc.model.certificate import certify
from tlc.model.weights import universal_model
from tlc.runtime import torch_runner

# Adds 0x01000001 (above 2^24) to an accumulator and counts down; the sums leave the
# range where float32 holds every integer right away.
LONG_LOOP = """
        PUSH 0
        LOCAL.SET 1
        PUSH {count}
        LOCAL.SET 0
loop:   LOCAL.GET 1
        PUSH 0x01000001
        ADD
        LOCAL.SET 1
        LOCAL.GET 0
        PUSH 1
        SUB
        LOCAL.TEE 0
        JNZ loop
        LOCAL.GET 1
        HALT
"""


def _long_run(count: int, max_steps: int):
    program = assemble(LONG_LOOP.format(count=count), "loop.tasm")
    (expected, expected_trace), (actual, trace) = run_both(
        torch_runner.run_program, program, b"", max_steps
    )
    assert trace == expected_trace, first_difference(expected_trace, trace)
    assert outcome(actual) == outcome(expected)
    return actual


def test_long_run_stays_exact():
    result = _long_run(600, 10_000)
    assert result.steps > 5000
    assert result.result == (600 * 0x01000001) % (1 << 32) - (1 << 32) * (
        (600 * 0x01000001) % (1 << 32) >= 1 << 31
    )


@pytest.mark.slow
def test_very_long_run_stays_exact():
    result = _long_run(12_000, 200_000)
    assert result.steps > 100_000


def test_certificate_fails_for_float32():
    model = universal_model()
    certificate = certify(model.domain, model.token_width, model.layers, model.unembed,
                          model.unembed_bias)  # fmt: skip
    certificate.bound = float(1 << 24)
    assert certificate.passed is False
    assert model.metadata["certificate"]["passed"] is True


def _state_residual(model, t1: int, t0: int) -> np.ndarray:
    """Embed a RUN token with sp = 2, T1 = t1, T0 = t0, and place the fetched LT_U."""
    schema = tk.SCHEMA
    token = schema.empty_token()
    token[schema.index("kind")] = tk.kind_id("RUN")
    schema.set_bits(token, "sp", 2)
    schema.set_bits(token, "t1", t1)
    schema.set_bits(token, "t0", t0)
    x = sum(table[value] for table, value in zip(model.embed, token))
    x = np.array(x, dtype=np.float64)
    number = model.metadata["opcodes"].index("LT_U")
    x[model.dims["fetched_op"][number]] = 1.0
    x[model.dims["fetch_hit"][0]] = 1.0
    return x


def _run_expert(expert, x: np.ndarray, dtype) -> np.ndarray:
    w1 = expert.w1.toarray().astype(dtype)
    w2 = expert.w2.toarray().astype(dtype)
    hidden = np.maximum(w1 @ x.astype(dtype) + expert.b1.astype(dtype), 0)
    return w2 @ hidden + expert.b2.astype(dtype)


def test_float32_gets_a_comparison_wrong():
    model = universal_model()
    layer = model.layers[0]
    expert = next(e for e in layer.experts if e.name == "lt_u")
    x = _state_residual(model, 0xFFFFFFFE, 0xFFFFFFFF)  # a < b: LT_U is 1
    result_dim = model.dims["next_t0"][0]
    exact = _run_expert(expert, x, np.float64)[result_dim]
    rounded = _run_expert(expert, x, np.float32)[result_dim]
    assert exact == 1.0
    assert rounded != 1.0
