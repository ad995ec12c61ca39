"""`tlc run`, `tlc asm` and the other commands through a real subprocess of `python -m tlc`,
plus in-process checks of the error paths that need a missing or broken module."""

from __future__ import annotations

import importlib
import io
import os
import pty
import re
import select
import subprocess
import sys
import time
import types

import pytest
from conftest import REPOSITORY

from tlc import cli
from tlc.compiler.assembler import assemble
from tlc.runtime.machine import MAX_INPUT_BYTES
from tlc.runtime.reference import run_program

EXAMPLES = REPOSITORY / "examples"
STATS_LINE = re.compile(
    r"steps=(\d+) seconds=(\d+\.\d+) steps_per_second=(\d+) backend=ref\Z"
)


def tlc(*arguments: str, stdin: bytes = b"", timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "tlc", *arguments],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=REPOSITORY,
    )


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_run_prints_output_and_exits_zero():
    completed = tlc("run", "--backend", "ref", "examples/countdown.tasm")
    assert completed.stdout == b"5\n4\n3\n2\n1\n"
    assert completed.returncode == 0
    assert completed.stderr == b""


def test_file_alone_means_run():
    completed = tlc("examples/factorial.tasm", "--backend", "ref")
    assert completed.returncode == 120


def test_exit_status_is_result_mod_256(tmp_path):
    path = write(tmp_path, "big.tasm", "PUSH -1\nHALT\n")
    assert tlc("--backend", "ref", path).returncode == 255


def test_stdin_reaches_program():
    completed = tlc("--backend", "ref", "examples/upcase.tasm", stdin=b"abc, Zz!\n")
    assert completed.stdout == b"ABC, ZZ!\n"


def test_result_option():
    completed = tlc("--backend", "ref", "--result", "examples/factorial.tasm")
    assert completed.stderr.decode().splitlines() == ["result=120"]


def test_result_option_empty_stack():
    completed = tlc("--backend", "ref", "--result", "examples/hello.tasm")
    assert completed.stderr.decode().splitlines() == ["result=none"]


def test_stats_is_last_stderr_line():
    completed = tlc("--backend", "ref", "--stats", "--result", "examples/factorial.tasm")
    lines = completed.stderr.decode().splitlines()
    match = STATS_LINE.match(lines[-1])
    assert match, lines
    expected = run_program(assemble((EXAMPLES / "factorial.tasm").read_text(), "f"))
    assert int(match.group(1)) == expected.steps


def test_trace_matches_reference_trace():
    completed = tlc("--backend", "ref", "--trace", "examples/factorial.tasm")
    lines: list[str] = []
    run_program(assemble((EXAMPLES / "factorial.tasm").read_text(), "f"), trace=lines.append)
    assert completed.stderr.decode().splitlines() == lines
    assert lines[0] == "step=0 ip=0 op=PUSH imm=5 depth=1 top=5 line=3"


def test_trap_message_and_status(tmp_path):
    path = write(tmp_path, "trap.tasm", "PUSH 1\n\nPUSH 0\nDIV_S\nHALT\n")
    completed = tlc("--backend", "ref", path)
    assert completed.returncode == 134
    expected = f"trap: integer divide by zero at ip=2 ({path} line 4)"
    assert completed.stderr.decode().splitlines() == [expected]


def test_trap_at_missing_address_has_no_line(tmp_path):
    path = write(tmp_path, "jump.tasm", "PUSH 0\nJZ 50\n")
    completed = tlc("--backend", "ref", path)
    assert completed.stderr.decode().splitlines() == ["trap: invalid jump target at ip=50"]


def test_step_limit(tmp_path):
    path = write(tmp_path, "loop.tasm", "top: PUSH 1\nJNZ top\n")
    completed = tlc("--backend", "ref", "--max-steps", "1000", "--stats", path)
    assert completed.returncode == 124
    lines = completed.stderr.decode().splitlines()
    assert lines[0] == "error: step limit of 1000 reached"
    assert lines[-1].startswith("steps=1000 ")


def test_memory_size_override(tmp_path):
    path = write(tmp_path, "mem.tasm", "PUSH 100\nI32.LOAD 0\nHALT\n")
    assert tlc("--backend", "ref", path).returncode == 0
    completed = tlc("--backend", "ref", "--memory-size", "64", path)
    assert completed.returncode == 134
    assert b"out of bounds memory access" in completed.stderr


def test_memory_size_override_out_of_range(tmp_path):
    path = write(tmp_path, "mem.tasm", "HALT\n")
    completed = tlc("--backend", "ref", "--memory-size", "2", path)
    assert completed.returncode == 2
    assert completed.stderr.startswith(b"error: ")


def test_compile_error_exit_one(tmp_path):
    path = write(tmp_path, "bad.tasm", "PUSH 1\n  ADD 2\n")
    completed = tlc("--backend", "ref", path)
    assert completed.returncode == 1
    assert completed.stderr.decode().splitlines() == [
        f"{path}:2:7: error: ADD takes no immediate",
        "  ADD 2",
        "      ^",
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["run", "--backend", "ref", "program.c"], "unsupported file type"),
        (["run", "--backend", "ref", "missing.tasm"], "missing.tasm: file not found"),
        (["ir", "examples/countdown.tasm"], "tlc ir needs a .tl file"),
        (["--backend", "ref", "--weights", "w.safetensors", "examples/hello.tasm"],
         "--weights needs the torch or mojo backend"),
    ],
)  # fmt: skip
def test_usage_errors_exit_two(arguments, message):
    completed = tlc(*arguments)
    assert completed.returncode == 2
    assert message in completed.stderr.decode()
    assert b"Traceback" not in completed.stderr


def test_run_names_a_folder(tmp_path):
    folder = tmp_path / "program.tl"
    folder.mkdir()
    completed = tlc("run", "--backend", "ref", str(folder))
    assert completed.returncode == 2
    assert f"{folder}: is a folder" in completed.stderr.decode()


def test_no_arguments_prints_usage():
    completed = tlc()
    assert completed.returncode == 2
    assert b"usage: tlc" in completed.stderr


def test_asm_round_trips(tmp_path):
    completed = tlc("asm", "examples/factorial.tasm")
    assert completed.returncode == 0
    printed = completed.stdout.decode()
    again = assemble(printed, "printed.tasm")
    original = assemble((EXAMPLES / "factorial.tasm").read_text(), "factorial.tasm")
    assert [(i.opcode, i.immediate) for i in again.instructions] == [
        (i.opcode, i.immediate) for i in original.instructions
    ]


def test_output_streams_before_exit(tmp_path):
    path = write(
        tmp_path,
        "stream.tasm",
        "PUSH 0xFFFFFFF0\nPUSH 65\nI32.STORE8 0\nspin: PUSH 1\nJNZ spin\n",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "tlc", "--backend", "ref", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "no output within 30 s"
        assert process.stdout.read(1) == b"A"
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


LONG_LOOP = "PUSH 3000000\nLOCAL.SET 0\ntop: LOCAL.GET 0\nPUSH 1\nSUB\nLOCAL.TEE 0\nJNZ top\nHALT\n"


def test_no_progress_when_piped(tmp_path):
    path = write(tmp_path, "long.tasm", LONG_LOOP)
    completed = tlc("--backend", "ref", path)
    assert completed.returncode == 0
    assert completed.stderr == b""


def test_progress_on_terminal(tmp_path):
    path = write(tmp_path, "long.tasm", LONG_LOOP)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "tlc", "--backend", "ref", path],
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        stdin=subprocess.DEVNULL,
    )
    os.close(terminal)
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1)
        if ready:
            try:
                chunk = os.read(controller, 1024)
            except OSError:
                break  # the child closed the terminal
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    process.wait()
    os.close(controller)
    assert process.returncode == 0
    assert b"steps=" in seen
    assert b"steps_per_second=" in seen


# --- in-process checks of missing and broken parts ---------------------------------


@pytest.fixture(autouse=True)
def empty_stdin(monkeypatch):
    """Give in-process runs an empty stdin instead of pytest's captured one."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))


def test_missing_backend_module(monkeypatch, capsys):
    monkeypatch.setitem(cli.BACKEND_MODULES, "torch", "tlc.runtime.no_such_runner")
    status = cli.main(["run", "--backend", "torch", str(EXAMPLES / "hello.tasm")])
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("error: backend 'torch' is not available: ")


def test_default_backend_without_mojo_is_torch(monkeypatch, capsys):
    monkeypatch.setitem(cli.BACKEND_MODULES, "mojo", "tlc.mojo.no_such_runner")
    monkeypatch.setitem(cli.BACKEND_MODULES, "torch", "tlc.runtime.no_such_runner")
    status = cli.main([str(EXAMPLES / "hello.tasm")])
    assert status == 2
    assert "backend 'torch' is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("attribute", "arguments", "what"),
    [
        ("MODEL_COMMANDS_MODULE", ["build", "x.tl", "-o", "w.safetensors"], "tlc build"),
        ("MODEL_COMMANDS_MODULE", ["inspect", "w.safetensors"], "tlc inspect"),
        ("BENCH_MODULE", ["bench"], "tlc bench"),
        ("DRIVER_MODULE", ["run", "--backend", "ref", "countdown.tl"], "the .tl compiler"),
    ],
)
def test_missing_command_module(monkeypatch, capsys, tmp_path, attribute, arguments, what):
    monkeypatch.setattr(cli, attribute, "tlc.no_such_module")
    monkeypatch.chdir(REPOSITORY)
    if arguments[-1].endswith(".tl"):
        arguments[-1] = write(tmp_path, "countdown.tl", "int main(void) { return 0; }\n")
    status = cli.main(arguments)
    assert status == 2
    assert f"error: {what} is not available: " in capsys.readouterr().err


def test_internal_error_exit_70(monkeypatch, capsys):
    def broken_run_program(program, **options):
        raise RuntimeError("boom")

    module = types.ModuleType("broken_backend")
    module.run_program = broken_run_program
    monkeypatch.setitem(sys.modules, "broken_backend", module)
    monkeypatch.setitem(cli.BACKEND_MODULES, "ref", "broken_backend")
    status = cli.main(["--backend", "ref", str(EXAMPLES / "hello.tasm")])
    assert status == 70
    assert capsys.readouterr().err == "error: internal error: RuntimeError: boom\n"


def test_tl_file_goes_through_driver(monkeypatch, capsys, tmp_path):
    compiled = assemble("PUSH 7\nHALT\n", "fake.tl")
    module = types.ModuleType("fake_driver")
    module.compile_file = lambda path: compiled
    module.ir_text = lambda path: f"ir of {path.name}"
    monkeypatch.setitem(sys.modules, "fake_driver", module)
    monkeypatch.setattr(cli, "DRIVER_MODULE", "fake_driver")
    path = write(tmp_path, "prog.tl", "int main(void) { return 7; }\n")
    assert cli.main(["--backend", "ref", path]) == 7
    assert cli.main(["ir", path]) == 0
    assert capsys.readouterr().out == "ir of prog.tl\n"


@pytest.mark.parametrize("backend", ["ref", "torch", "mojo"])
def test_run_program_checks_its_arguments(backend):
    module = importlib.import_module(cli.BACKEND_MODULES[backend])
    program = assemble("PUSH 1\nHALT\n", "one.tasm")
    with pytest.raises(TypeError, match="stdin must be bytes, not str"):
        module.run_program(program, stdin="abc")
    with pytest.raises(ValueError, match="max_steps must be 0 or more, not -3"):
        module.run_program(program, max_steps=-3)
    with pytest.raises(TypeError, match="not float"):
        module.run_program(program, max_steps=2.5)
    with pytest.raises(TypeError, match="stdin must be bytes, not memoryview"):
        module.run_program(program, stdin=memoryview(b"abcd").cast("B", (2, 2)))
    too_long = bytes(MAX_INPUT_BYTES + 1)
    with pytest.raises(ValueError, match="stdin has 1,048,576 bytes, more than the 1,048,575"):
        module.run_program(program, stdin=too_long)
