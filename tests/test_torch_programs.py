"""Programs run inside the model by the PyTorch runtime, compared with the reference
interpreter trace for trace: stack shuffles, jumps, calls, locals, memory, I/O, traps."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_helpers import first_difference, outcome, run_both

from tlc.compiler.assembler import assemble
from tlc.runtime import torch_runner
from tlc.runtime.machine import Status, Trap

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

PROGRAMS = {
    "push-halt": "PUSH 7\nPUSH -2\nHALT",
    "empty-halt": "HALT",
    "swap": "PUSH 1\nPUSH 2\nSWAP\nHALT",
    "over-dup": "PUSH 1\nPUSH 2\nOVER\nDUP\nHALT",
    "rot": "PUSH 1\nPUSH 2\nPUSH 3\nROT\nHALT",
    "nop": "PUSH 4\nNOP\nNOP\nHALT",
    "deep-spill-and-reload": "\n".join([f"PUSH {i}" for i in range(1, 9)] + ["POP"] * 6
                                       + ["HALT"]),  # fmt: skip
    "select-nonzero": "PUSH 1\nPUSH 2\nPUSH 3\nPUSH 4\nPUSH 5\nPUSH 7\nSELECT\nSELECT\nHALT",
    "select-zero": "PUSH 1\nPUSH 2\nPUSH 3\nPUSH 4\nPUSH 5\nPUSH 0\nSELECT\nPOP\nPOP\nHALT",
    "jz-taken": "PUSH 0\nJZ 3\nPUSH 9\nPUSH 8\nHALT",
    "jz-not-taken": "PUSH 5\nJZ 3\nPUSH 9\nHALT",
    "jnz-loop": "PUSH 3\nloop: PUSH 1\nSUB\nDUP\nJNZ loop\nHALT",
    "call-return": "CALL 3\nPUSH 1\nHALT\nCALL 6\nPUSH 2\nRETURN\nPUSH 3\nRETURN",
    "locals-per-frame": "PUSH 5\nLOCAL.SET 0\nCALL f\nLOCAL.GET 0\nHALT\n"
                        "f: PUSH 9\nLOCAL.SET 0\nLOCAL.GET 0\nLOCAL.GET 1\nADD\nRETURN",
    "local-tee": "PUSH 7\nLOCAL.TEE 3\nLOCAL.GET 3\nADD\nLOCAL.GET 4\nHALT",
    "store-load-widths": ".memory 16\nPUSH 12\nPUSH 0x81828384\nI32.STORE 0\n"
                         "PUSH 13\nI32.LOAD8_S 0\nPUSH 14\nI32.LOAD16_S 0\nPUSH 11\n"
                         "I32.LOAD 0\nPUSH 15\nI32.LOAD8_U 0\nPUSH 12\nI32.LOAD16_U 0\nHALT",
    "unaligned-store16": ".memory 16\nPUSH 1\nPUSH 0x81828384\nI32.STORE16 2\nPUSH 0\n"
                         "I32.LOAD 0\nPUSH 0\nI32.LOAD 1\nHALT",
    "data-segments": '.data 5 "abcdefg"\n.data 7 1 2\nPUSH 3\nI32.LOAD 0\nPUSH 6\n'
                     "I32.LOAD16_S 1\nHALT",
    "stdin-and-eof": "PUSH 0xFFFFFFF4\nI32.LOAD 0\nPUSH 0xFFFFFFF4\nI32.LOAD 0\n"
                     "PUSH 0xFFFFFFF4\nI32.LOAD 0\nHALT",
    "stdout": "PUSH 0xFFFFFFF0\nPUSH 65\nI32.STORE8 0\nPUSH 0xFFFFFFEF\nPUSH 0x142\n"
              "I32.STORE8 1\nHALT",
    "alu-mix": "PUSH 3\nPUSH 5\nLT_S\nPUSH -3\nPUSH 5\nLT_U\nPUSH 5\nPUSH 5\nEQ\nPUSH 6\n"
               "PUSH 5\nNE\nPUSH 0\nEQZ\nPUSH 12\nPUSH 10\nXOR\nPUSH 12\nPUSH 10\nOR\nHALT",
}

TRAPS = {
    "underflow-pop": ("POP\nHALT", Trap.STACK_UNDERFLOW),
    "underflow-swap": ("PUSH 1\nSWAP\nHALT", Trap.STACK_UNDERFLOW),
    "overflow": ("\n".join(["PUSH 1"] * 1025 + ["HALT"]), Trap.STACK_OVERFLOW),
    "jump-past-code": ("PUSH 0\nJZ 100\nHALT", Trap.INVALID_JUMP_TARGET),
    "jump-to-high-address": ("PUSH 1\nJNZ 0x12345678\nHALT", Trap.INVALID_JUMP_TARGET),
    "run-off-the-end": ("PUSH 1", Trap.INVALID_JUMP_TARGET),
    "return-outside-call": ("RETURN", Trap.RETURN_OUTSIDE_CALL),
    "call-stack-exhausted": ("loop: CALL loop", Trap.CALL_STACK_EXHAUSTED),
    "load-past-end": (".memory 16\nPUSH 13\nI32.LOAD 0\nHALT", Trap.OUT_OF_BOUNDS),
    "load8-at-input-port": ("PUSH 0xFFFFFFF4\nI32.LOAD8_U 0\nHALT", Trap.OUT_OF_BOUNDS),
    "store32-at-output-port": ("PUSH 0xFFFFFFF0\nPUSH 65\nI32.STORE 0\nHALT",
                               Trap.OUT_OF_BOUNDS),  # fmt: skip
    "store-with-wrapping-offset": ("PUSH 1\nPUSH 2\nI32.STORE8 0xFFFFFFFF\nHALT",
                                   Trap.OUT_OF_BOUNDS),  # fmt: skip
    "store-underflow-at-port": ("PUSH 0xFFFFFFF0\nI32.STORE8 0\nHALT", Trap.STACK_UNDERFLOW),
}


def _check(source: str, stdin: bytes = b"xy", max_steps: int = 2000):
    program = assemble(source, "test.tasm")
    (expected, expected_trace), (actual, actual_trace) = run_both(
        torch_runner.run_program, program, stdin, max_steps
    )
    assert actual_trace == expected_trace, first_difference(expected_trace, actual_trace)
    assert outcome(actual) == outcome(expected)
    return actual


@pytest.mark.parametrize("name", PROGRAMS)
def test_torch_program_matches_reference(name):
    _check(PROGRAMS[name])


@pytest.mark.parametrize("name", TRAPS)
def test_torch_trap_matches_reference(name):
    source, trap = TRAPS[name]
    result = _check(source)
    assert result.status is Status.TRAPPED
    assert result.trap is trap


def test_torch_step_limit():
    result = _check("loop: PUSH 1\nJNZ loop", max_steps=101)
    assert result.status is Status.STEP_LIMIT
    assert result.steps == 101


def test_torch_zero_step_limit():
    result = torch_runner.run_program(assemble("HALT", "t"), max_steps=0)
    assert result.status is Status.STEP_LIMIT
    assert result.steps == 0


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.tasm")), ids=lambda p: p.name)
def test_torch_example(path):
    program = assemble(path.read_text(), path.name)
    stdin_path = path.with_suffix(".in")
    stdin = stdin_path.read_bytes() if stdin_path.exists() else b"Hello, World"
    (expected, expected_trace), (actual, actual_trace) = run_both(
        torch_runner.run_program, program, stdin, 20000
    )
    assert actual_trace == expected_trace, first_difference(expected_trace, actual_trace)
    assert outcome(actual) == outcome(expected)


def test_torch_streams_output():
    written: list[bytes] = []
    program = assemble("PUSH 0xFFFFFFF0\nPUSH 104\nI32.STORE8 0\nPUSH 0xFFFFFFF0\n"
                       "PUSH 105\nI32.STORE8 0\nHALT", "t")  # fmt: skip
    result = torch_runner.run_program(program, write_output=written.append)
    assert written == [b"h", b"i"]
    assert result.output == b"hi"


def test_torch_rejects_uncomputed_opcode(monkeypatch):
    model = torch_runner.load_model()
    covered = [name for name in model.metadata["covered_opcodes"] if name != "ADD"]
    monkeypatch.setitem(model.metadata, "covered_opcodes", covered)
    with pytest.raises(ValueError, match="does not compute ADD"):
        torch_runner.run_program(assemble("PUSH 1\nPUSH 2\nADD\nHALT", "t"))


def test_prefill_matches_token_by_token():
    import torch

    from tlc.model import tokens as tk

    model = torch_runner.load_model()
    program = assemble(PROGRAMS["data-segments"], "t.tasm")
    prompt = torch.from_numpy(tk.encode_prompt(model.metadata, program, b"abc"))
    model.reset()
    batched = model.prefill(prompt)
    batched_sizes = model.state.cache_sizes()
    model.reset()
    for token in prompt[:-1]:
        model.step(token)
    stepped = model.step(prompt[-1])
    stepped_sizes = model.state.cache_sizes()
    assert (batched == stepped).all()
    assert batched_sizes == stepped_sizes
