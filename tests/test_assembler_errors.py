"""Located assembler errors: one table of bad inputs, several errors per run, and the CLI's
exit status and output for them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tlc.compiler.assembler import assemble
from tlc.compiler.errors import CompileError

# (source, line, column, fragment of the message)
BAD_INPUTS = [
    ("FROB 1", 1, 1, "unknown mnemonic 'FROB'"),
    ("NOP\n  PUSH", 2, 7, "PUSH needs an immediate"),
    ("LOCAL.GET", 1, 10, "needs an immediate"),
    ("ADD 3", 1, 5, "ADD takes no immediate"),
    ("PUSH 12x", 1, 6, "malformed number '12x'"),
    ("PUSH 0x", 1, 6, "malformed number"),
    ("PUSH --1", 1, 6, "malformed number"),
    ("LOCAL.GET 256", 1, 11, "local index 256 is out of range"),
    ("LOCAL.SET -1", 1, 11, "local index -1 is out of range"),
    ("PUSH 4294967296", 1, 6, "out of range"),
    ("PUSH -2147483649", 1, 6, "out of range"),
    ("I32.LOAD 0x100000000", 1, 10, "out of range"),
    ("JZ nowhere", 1, 4, "undefined label 'nowhere'"),
    ("a: NOP\na: NOP", 2, 1, "duplicate label 'a' (first defined on line 1)"),
    ("PUSH 1 2", 1, 8, "unexpected '2' after the immediate"),
    ("LOCAL.GET x", 1, 11, "malformed number 'x'"),
    ("JZ end:", 1, 4, "must come before the mnemonic"),
    ('PUSH "a"', 1, 6, "found a string"),
    ('.data 0 "abc', 1, 9, "unterminated string"),
    ('.data 0 "a\\q"', 1, 11, "invalid escape sequence"),
    (".data 0 256", 1, 9, "byte 256 is out of range"),
    (".data", 1, 1, ".data needs an address"),
    (".data 65535 1 2\nHALT", 1, 1, "does not fit in memory of 65536 bytes"),
    (".memory 2", 1, 9, "memory size 2 is out of range"),
    (".memory 0x200000", 1, 9, "out of range"),
    (".memory 64\n.memory 64", 2, 1, "duplicate .memory directive"),
    (".stack 5", 1, 1, "unknown directive '.stack'"),
    ("; only a comment", 1, 1, "program has no instructions"),
]


@pytest.mark.parametrize(("source", "line", "column", "fragment"), BAD_INPUTS)
def test_bad_input_is_located(source, line, column, fragment):
    with pytest.raises(CompileError) as caught:
        assemble(source, "bad.tasm")
    first = caught.value.diagnostics[0]
    assert first.file == "bad.tasm"
    assert first.line == line
    assert first.column == column
    assert fragment in first.message


def test_several_errors_collected():
    source = "FROB\nPUSH\nADD 1\nJZ missing\nHALT"
    with pytest.raises(CompileError) as caught:
        assemble(source, "bad.tasm")
    assert [d.line for d in caught.value.diagnostics] == [1, 2, 3, 4]


def test_error_rendering_shows_source_and_caret():
    with pytest.raises(CompileError) as caught:
        assemble("NOP\n    PUSH 12x\n", "bad.tasm")
    assert str(caught.value).splitlines() == [
        "bad.tasm:2:10: error: malformed number '12x'",
        "    PUSH 12x",
        "         ^",
    ]


def test_cli_reports_assembler_errors(tmp_path):
    path = tmp_path / "bad.tasm"
    path.write_text("PUSH 1\nFROB\nLOCAL.GET 300\n")
    completed = subprocess.run(
        [sys.executable, "-m", "tlc", "run", "--backend", "ref", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert f"{path}:2:1: error: unknown mnemonic 'FROB'" in completed.stderr
    assert f"{path}:3:11: error: local index 300 is out of range" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""
