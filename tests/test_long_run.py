"""The torch-versus-Mojo token comparison of `tlc.mojo.long_run`.

The full comparison, over two million tokens, is a benchmark recorded in
docs/benchmarks.md. Here it runs on a few thousand tokens, and the fingerprint and
comparison helpers are checked on their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlc.cli import load_program
from tlc.mojo import build, long_run
from tlc.runtime import reference

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FIELDS = 12


@settings(max_examples=200, deadline=None)
@given(
    token=st.lists(st.integers(0, 60), min_size=FIELDS, max_size=FIELDS),
    field=st.integers(0, FIELDS - 1),
    delta=st.integers(1, 60),
)
def test_fingerprint_changes_with_any_one_field(token, field, delta):
    weights = long_run.multipliers(FIELDS)
    changed = list(token)
    changed[field] += delta
    rows = np.array([token, changed], dtype=np.int64)
    first, second = long_run.fingerprints(rows, weights)
    assert first != second


def test_fingerprint_depends_only_on_token():
    weights = long_run.multipliers(FIELDS)
    rows = np.array([[1] * FIELDS, [2] * FIELDS, [1] * FIELDS], dtype=np.int64)
    prints = long_run.fingerprints(rows, weights)
    assert prints[0] == prints[2]
    assert prints[0] != prints[1]


def test_compare_finds_first_difference():
    first = np.arange(10, dtype=np.uint64)
    second = first.copy()
    second[7] += np.uint64(1)
    second[9] += np.uint64(1)
    assert long_run.compare(first, second).first_difference == 7


def test_compare_equal_streams():
    first = np.arange(10, dtype=np.uint64)
    comparison = long_run.compare(first, first.copy())
    assert comparison.first_difference is None
    assert comparison.tokens == 10


def test_compare_prefix_differs_at_its_end():
    first = np.arange(10, dtype=np.uint64)
    assert long_run.compare(first, first[:6]).first_difference == 6


def test_torch_and_mojo_agree_on_collatz_prefix():
    try:
        build.load_extension()
    except build.MojoCompilerMissing as error:
        pytest.skip(f"the Mojo runtime cannot be built on this machine: {error}")
    program = load_program(str(EXAMPLES / "collatz.tl"))
    max_steps = 2500
    expected = reference.run_program(program, max_steps=max_steps)
    torch_run = long_run.run_torch(None, program, b"", max_steps)
    mojo_run = long_run.run_mojo(None, program, b"", max_steps)
    assert len(torch_run.fingerprints) == max_steps
    assert long_run.compare(torch_run.fingerprints, mojo_run.fingerprints).first_difference is None
    assert torch_run.result.steps == expected.steps
    assert mojo_run.result.output == expected.output


def test_main_reports_identical_runs(capsys):
    try:
        build.load_extension()
    except build.MojoCompilerMissing as error:
        pytest.skip(f"the Mojo runtime cannot be built on this machine: {error}")
    status = long_run.main([str(EXAMPLES / "hungarian.tl"), "--max-steps", "800"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "identical=True" in printed
    assert "tokens=800" in printed


def test_main_rejects_missing_program(capsys):
    status = long_run.main([str(EXAMPLES / "missing.tl")])
    assert status == 2
    assert "missing.tl: file not found" in capsys.readouterr().err


def test_main_rejects_zero_step_limit():
    with pytest.raises(SystemExit) as exit_info:
        long_run.main([str(EXAMPLES / "collatz.tl"), "--max-steps", "0"])
    assert exit_info.value.code == 2


def test_main_reports_compile_error(tmp_path, capsys):
    source = tmp_path / "bad.tl"
    source.write_text("int main(void) { return x; }\n")
    status = long_run.main([str(source)])
    assert status == 2
    assert "'x' undeclared" in capsys.readouterr().err


def test_main_rejects_damaged_weights(tmp_path, capsys):
    weights = tmp_path / "bad.safetensors"
    weights.write_bytes(b"not a weight file")
    status = long_run.main([str(EXAMPLES / "collatz.tl"), "--weights", str(weights)])
    assert status == 2
    assert "bad.safetensors: not a readable safetensors file" in capsys.readouterr().err


def test_main_rejects_uncovered_opcode(tmp_path, capsys):
    from tlc.model.weights import load_weights, save_weights, universal_model, write_weight_file

    weights = tmp_path / "no_div.safetensors"
    save_weights(universal_model(), weights)
    tensors, metadata = load_weights(weights)
    metadata["covered_opcodes"] = [name for name in metadata["covered_opcodes"]
                                   if name != "DIV_U"]  # fmt: skip
    write_weight_file(weights, tensors, metadata)
    status = long_run.main([str(EXAMPLES / "collatz.tl"), "--weights", str(weights)])
    assert status == 2
    assert "does not compute DIV_U" in capsys.readouterr().err
