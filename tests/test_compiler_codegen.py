"""Code generation: the calling convention, loop rotation, signedness of the chosen
opcodes, constant folding, memory frames and the `tlc ir` / `tlc asm` commands."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from tlc.compiler.assembler import assemble, disassemble
from tlc.compiler.driver import compile_file, compile_source, ir_text
from tlc.compiler.isa import Opcode
from tlc.runtime.machine import Status, Trap
from tlc.runtime.reference import run_program

REPOSITORY = Path(__file__).resolve().parents[1]


def function_opcodes(program, name: str) -> list[Opcode]:
    """Return the opcodes of function `name`, up to the next function's label."""
    start = program.labels[name]
    ends = [address for address in program.labels.values() if address > start]
    end = min(ends, default=len(program.instructions))
    return [instruction.opcode for instruction in program.instructions[start:end]]


def executed_opcodes(program) -> Counter:
    counts: Counter = Counter()

    def trace(line: str) -> None:
        counts[line.split(" op=")[1].split(" ")[0]] += 1

    result = run_program(program, trace=trace)
    assert result.status is Status.HALTED
    return counts


def test_entry_calls_main_then_halts():
    program = compile_source("int main(void) { return 300; }", "t.tl")
    first = program.instructions[:2]
    assert [i.opcode for i in first] == [Opcode.CALL, Opcode.HALT]
    assert first[0].immediate == program.labels["main"]
    result = run_program(program)
    assert result.result == 300
    assert result.exit_status == 300 & 255


def test_callee_moves_arguments_into_locals():
    source = ("int pick(int a, int b, int c) { return a - b + c; }\n"
              "int main(void) { return pick(10, 3, 1); }\n")
    program = compile_source(source, "t.tl")
    start = program.labels["pick"]
    prologue = program.instructions[start : start + 3]
    assert [(i.opcode, i.immediate) for i in prologue] == [
        (Opcode.LOCAL_SET, 2), (Opcode.LOCAL_SET, 1), (Opcode.LOCAL_SET, 0)]
    assert run_program(program).result == 8


def test_loop_iteration_costs_one_branch():
    source = ("int main(void) { int i, s = 0;\n"
              "  for (i = 0; i < 100; i++) s += i;\n"
              "  while (i > 0) i -= 2;\n"
              "  do { s++; } while (s < 5000);\n"
              "  return s & 255; }\n")
    counts = executed_opcodes(compile_source(source, "t.tl"))
    # for: 1 entry test + 100 bottom tests; while: 1 + 50; do-while: 50 bottom tests.
    assert counts["JZ"] + counts["JNZ"] == 101 + 51 + (5000 - 4950)


def test_signedness_picks_opcodes():
    source = ("int sdiv(int a, int b) { return a / b + a % b + (a >> 1) + (a < b); }\n"
              "unsigned udiv(unsigned a, unsigned b) { return a / b + a % b + (a >> 1)"
              " + (a < b); }\n"
              "char c[2]; unsigned char uc[2]; short s[2]; unsigned short us[2];\n"
              "int loads(void) { return c[1] + uc[1] + s[1] + us[1]; }\n"
              "int main(void) { return sdiv(7, 2) + udiv(7u, 2u) + loads(); }\n")
    program = compile_source(source, "t.tl")
    signed = set(function_opcodes(program, "sdiv"))
    unsigned = set(function_opcodes(program, "udiv"))
    loads = set(function_opcodes(program, "loads"))
    assert {Opcode.DIV_S, Opcode.REM_S, Opcode.SHR_S, Opcode.LT_S} <= signed
    assert {Opcode.DIV_U, Opcode.REM_U, Opcode.SHR_U, Opcode.LT_U} <= unsigned
    assert {Opcode.I32_LOAD8_S, Opcode.I32_LOAD8_U, Opcode.I32_LOAD16_S,
            Opcode.I32_LOAD16_U} <= loads


def test_constant_expressions_fold_with_c_rules():
    source = ("int main(void) { return (char) 300 + -7 / 2 * 10 + -7 % 2 * 100"
              " + (int) (1u << 31 >> 30) * 1000 + (unsigned char) -1 * 10000; }\n")
    program = compile_source(source, "t.tl")
    opcodes = function_opcodes(program, "main")
    assert opcodes == [Opcode.PUSH, Opcode.RETURN]
    assert run_program(program).result == 44 - 30 - 100 + 2000 + 2550000


def test_multiply_by_power_of_two_becomes_shift():
    program = compile_source("int f(int x) { return x * 8; }\n"
                             "int main(void) { return f(5); }\n", "t.tl")
    opcodes = function_opcodes(program, "f")
    assert Opcode.SHL in opcodes
    assert Opcode.MUL not in opcodes


def test_unsigned_divide_by_power_of_two_becomes_shift():
    program = compile_source("unsigned f(unsigned x) { return x / 16 + x % 16; }\n"
                             "int main(void) { return f(100u); }\n", "t.tl")
    opcodes = function_opcodes(program, "f")
    assert Opcode.DIV_U not in opcodes
    assert Opcode.REM_U not in opcodes
    assert run_program(program).result == 6 + 4


def test_exhausted_memory_stack_traps():
    source = ("int dive(int n) { int a[200]; a[n & 7] = n; return dive(n + 1) + a[0]; }\n"
              "int main(void) { return dive(0); }\n")
    result = run_program(compile_source(source, "t.tl"), max_steps=10_000_000)
    assert result.status is Status.TRAPPED
    assert result.trap is Trap.OUT_OF_BOUNDS


def test_deep_recursion_exhausts_call_stack():
    source = "int down(int n) { return down(n + 1) + 1; }\nint main(void) { return down(0); }\n"
    result = run_program(compile_source(source, "t.tl"), max_steps=10_000_000)
    assert result.status is Status.TRAPPED
    assert result.trap is Trap.CALL_STACK_EXHAUSTED


def test_division_by_zero_traps():
    source = "int zero = 0;\nint main(void) { return 5 / zero; }\n"
    result = run_program(compile_source(source, "t.tl"))
    assert result.trap is Trap.DIVIDE_BY_ZERO


def test_frames_are_released_on_return():
    source = ("int f(int n) { int a[64]; a[n] = n; return a[n]; }\n"
              "int main(void) { int i, s = 0; for (i = 0; i < 2000; i++) s += f(i & 63);"
              " return s & 255; }\n")
    result = run_program(compile_source(source, "t.tl"))
    assert result.status is Status.HALTED
    expected = sum(i & 63 for i in range(2000)) & 255
    assert result.exit_status == expected


def test_large_data_grows_memory():
    program = compile_source("int big[40000];\nint main(void) { big[39999] = 3;"
                             " return big[39999]; }\n", "t.tl")
    assert program.memory_size >= 40000 * 4
    assert run_program(program).result == 3


def test_ir_text_shows_functions_and_branches():
    text = ir_text(REPOSITORY / "examples" / "fibonacci.tl")
    assert "function fib_recursive(params 1" in text
    assert "function main(" in text
    assert "branch " in text


def test_cli_ir_and_asm_commands():
    path = REPOSITORY / "examples" / "primes.tl"
    ir = subprocess.run([sys.executable, "-m", "tlc", "ir", str(path)], capture_output=True,
                        text=True)
    asm = subprocess.run([sys.executable, "-m", "tlc", "asm", str(path)], capture_output=True,
                         text=True)
    assert ir.returncode == 0, ir.stderr
    assert "function main" in ir.stdout
    assert asm.returncode == 0, asm.stderr
    assert "call" in asm.stdout.lower()


def test_cli_runs_tl_with_exit_status():
    path = REPOSITORY / "examples" / "nqueens.tl"
    completed = subprocess.run([sys.executable, "-m", "tlc", "run", "--backend", "ref",
                                str(path)], capture_output=True)
    assert completed.returncode == 0
    assert b"8 queens: 92 solutions" in completed.stdout


def test_asm_text_assembles_to_same_program():
    program = compile_file(REPOSITORY / "examples" / "strings.tl")
    again = assemble(disassemble(program), "strings.tasm")
    assert [(i.opcode, i.immediate) for i in again.instructions] == [
        (i.opcode, i.immediate) for i in program.instructions]
    assert again.memory_size == program.memory_size
    assert again.initial_memory() == program.initial_memory()
