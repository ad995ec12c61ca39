"""Programs run inside the interpreter model by the Mojo runtime.

Traced runs must print the reference interpreter's trace line for line and reach the
same outcome. Untraced runs decode only the last two tokens, and must reach the same
outcome too. At the model level, the Mojo token stream must equal the numpy oracle's
token for token. The program tables come from the PyTorch runtime's tests, so both
runtimes run the same programs.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import wast
from conftest import conformance_cases
from model_helpers import first_difference, outcome, run_both
from test_torch_programs import PROGRAMS, TRAPS

from tlc.compiler.assembler import assemble
from tlc.mojo import build, reference, runner
from tlc.mojo.weights import weights_from_tensors
from tlc.runtime import reference as interpreter
from tlc.runtime.machine import Status

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CASES = [case for name in ("i32.wast", "address.wast", "endianness.wast")
         for case in conformance_cases(name)]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def universal():
    """Build the extension and the universal model once; skip only when no Mojo
    compiler is installed."""
    try:
        build.load_extension()
    except build.MojoCompilerMissing as error:
        pytest.skip(f"the Mojo runtime cannot be built on this machine: {error}")
    return runner.load_universal()


def covered(program) -> None:
    """Skip the calling test when the model does not compute an opcode of `program`."""
    from tlc.model.weights import uncovered_opcodes

    missing = uncovered_opcodes(runner.load_universal()[0].metadata, program)
    if missing:
        pytest.skip(f"the model does not compute {', '.join(missing)} yet")


def check(program, stdin: bytes = b"xy", max_steps: int = 2000, **options):
    """Compare traced and untraced Mojo runs with the reference; return the result."""
    covered(program)
    (expected, expected_trace), (actual, actual_trace) = run_both(
        runner.run_program, program, stdin, max_steps, **options
    )
    assert actual_trace == expected_trace, first_difference(expected_trace, actual_trace)
    assert outcome(actual) == outcome(expected)
    untraced = runner.run_program(program, stdin=stdin, max_steps=max_steps, **options)
    assert outcome(untraced) == outcome(expected)
    return actual


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_matches_reference(name):
    check(assemble(PROGRAMS[name], "test.tasm"))


@pytest.mark.parametrize("name", TRAPS)
def test_trap_matches_reference(name):
    source, trap = TRAPS[name]
    result = check(assemble(source, "test.tasm"))
    assert result.status is Status.TRAPPED
    assert result.trap is trap


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.tasm")), ids=lambda p: p.name)
def test_example_matches_reference(path):
    stdin_path = path.with_suffix(".in")
    stdin = stdin_path.read_bytes() if stdin_path.exists() else b"Hello, World"
    check(assemble(path.read_text(), path.name), stdin, 20000)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_conformance_case(case: wast.WastCase):
    result = check(case.program, b"")
    if case.expected.trap is None:
        assert result.status is Status.HALTED, result
        assert result.result == case.expected.result
    else:
        assert result.status is Status.TRAPPED, result
        assert result.trap is case.expected.trap


@pytest.mark.parametrize("max_steps", [0, 1, 2, 101])
def test_step_limit(max_steps):
    result = check(assemble("loop: PUSH 1\nJNZ loop", "t"), max_steps=max_steps)
    assert result.status is Status.STEP_LIMIT
    assert result.steps == max_steps


def test_output_streams_per_chunk():
    written: list[bytes] = []
    program = assemble("PUSH 0xFFFFFFF0\nPUSH 104\nI32.STORE8 0\nPUSH 0xFFFFFFF0\n"
                       "PUSH 105\nI32.STORE8 0\nHALT", "t")  # fmt: skip
    result = runner.run_program(program, write_output=written.append)
    assert b"".join(written) == b"hi"
    assert result.output == b"hi"


def test_progress_reports_steps():
    reports: list[int] = []
    program = assemble("PUSH 3000\nloop: PUSH 1\nSUB\nDUP\nJNZ loop\nHALT", "t")
    covered(program)
    result = runner.run_program(program, progress=reports.append)
    assert reports
    assert reports == sorted(reports)
    assert reports[-1] <= result.steps


def test_tokens_equal_numpy_oracle():
    weights, _ = runner.load_universal()
    program = assemble(PROGRAMS["call-return"], "t")
    from tlc.model import tokens

    prompt = tokens.encode_prompt(weights.metadata, program, b"")
    expected, expected_output = reference.run_tokens(weights, prompt, 50)
    actual, output = runner.run_tokens(weights, prompt, 50)
    assert np.array_equal(actual, expected)
    assert output == expected_output


def test_shuffled_numbering_runs_unchanged(tmp_path):
    from tlc.model import tokens
    from tlc.model.weights import save_weights, universal_model

    numbering = tokens.default_numbering()
    random.Random(5).shuffle(numbering)
    path = tmp_path / "shuffled.safetensors"
    save_weights(universal_model(tuple(numbering)), path)
    check(assemble(PROGRAMS["alu-mix"], "t"), weights=path)


def fresh_universal_weights():
    """Return a private copy of the universal model's weights, safe to modify."""
    from tlc.model.weights import model_tensors, universal_model

    model = universal_model()
    tensors, shapes = model_tensors(model)
    return weights_from_tensors(tensors, dict(model.metadata, shapes=shapes))


def test_corrupted_expert_breaks_its_programs():
    from tlc.model import tokens

    weights = fresh_universal_weights()
    program = assemble("PUSH 5\nPUSH 7\nXOR\nHALT", "t")
    covered(program)
    corrupted = 0
    for layer, layout in zip(weights.layers, weights.metadata["layers"], strict=True):
        for expert, entry in zip(layer.experts, layout["experts"], strict=True):
            if "XOR" in entry.get("opcodes", []):
                expert.w2.values[:] = 0.0
                corrupted += 1
    assert corrupted > 0
    prompt = tokens.encode_prompt(weights.metadata, program, b"")
    generated, _ = runner.run_tokens(weights, prompt, 10)
    decoder = tokens.TokenDecoder(weights.metadata, program)
    for token in generated:
        if not decoder.feed(token):
            break
    expected = interpreter.run_program(program)
    assert outcome(decoder.result) != outcome(expected)


def test_trace_spans_several_chunks():
    weights, _ = runner.load_universal()
    chunk = runner.max_recorded_chunk(len(weights.fields))
    iterations = chunk // 2  # four steps per iteration: two chunks and a part
    program = assemble(f"PUSH {iterations}\nloop: PUSH 1\nSUB\nDUP\nJNZ loop\nHALT", "t")
    result = check(program, max_steps=10 * chunk)
    assert result.steps > 2 * chunk
    assert result.status is Status.HALTED
