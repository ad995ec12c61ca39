"""Random well-formed programs (tests/tlgen.py) behave the same under tlc and gcc.

CI runs a few dozen examples. Set TLC_HYPOTHESIS_PROFILE=long for a long local run.
"""

from __future__ import annotations

import os

import tlgen
from c_oracle import run_with_gcc
from hypothesis import HealthCheck, given, settings

from tlc.compiler.driver import compile_source
from tlc.runtime.machine import Status
from tlc.runtime.reference import run_program

PROFILE_EXAMPLES = {"ci": 30, "long": 2000}
EXAMPLES = PROFILE_EXAMPLES.get(os.environ.get("TLC_HYPOTHESIS_PROFILE", "ci"),
                                PROFILE_EXAMPLES["ci"])
# Generated programs are bounded far below this; reaching it means a miscompiled loop.
MAX_STEPS = 5_000_000


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(source=tlgen.programs())
def test_random_program_matches_gcc(source: str, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("random")
    path = work_dir / "program.c"
    path.write_text(source)
    native = run_with_gcc(path, work_dir)
    result = run_program(compile_source(source, "program.tl"), max_steps=MAX_STEPS)
    assert result.status is Status.HALTED, f"{result.status} {result.trap}"
    assert result.output.decode("latin-1") == native.output.decode("latin-1")
    assert result.exit_status == native.exit_status
