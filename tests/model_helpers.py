"""Differential checks of the model runtimes against the reference interpreter."""

from __future__ import annotations

from tlc.runtime import reference
from tlc.runtime.machine import Program, RunResult


def outcome(result: RunResult) -> tuple:
    """Return the fields of a result that every backend must agree on."""
    return (result.status, result.steps, result.output, result.result, result.trap,
            result.trap_ip)  # fmt: skip


def run_both(run_program, program: Program, stdin: bytes = b"", max_steps: int = 2000,
             **options):  # fmt: skip
    """Run `program` on the reference and on `run_program`; return both results and
    both traces as ((ref_result, ref_trace), (other_result, other_trace))."""
    ref_trace: list[str] = []
    other_trace: list[str] = []
    expected = reference.run_program(program, stdin=stdin, max_steps=max_steps,
                                     trace=ref_trace.append)  # fmt: skip
    actual = run_program(program, stdin=stdin, max_steps=max_steps, trace=other_trace.append,
                         **options)  # fmt: skip
    return (expected, ref_trace), (actual, other_trace)


def first_difference(expected: list[str], actual: list[str]) -> str:
    """Describe where two traces first differ, for assertion messages."""
    for index, (a, b) in enumerate(zip(expected, actual)):
        if a != b:
            return f"step {index}: reference {a!r}, model {b!r}"
    return f"lengths {len(expected)} and {len(actual)}"
