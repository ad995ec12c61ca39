"""`tlc bench`: run the benchmark programs on every backend and print one table.

Each (program, backend) pair runs in its own Python process, so the peak resident memory
reported for it is that run's alone. The native row compiles the same `.tl` file with
`gcc -O2` (every `.tl` program is C) and times the executable: the physical limit the
model runtimes are measured against.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_PROGRAMS = ("hungarian.tl", "sudoku.tl")
BACKENDS = ("ref", "torch", "mojo")
# The native run has no step limit, so a program that never halts is stopped by time.
NATIVE_TIMEOUT_SECONDS = 60
MAX_BATCH = 65536


@dataclass
class Measurement:
    """One row of the benchmark table."""

    program: str
    backend: str
    steps: int | None
    seconds: float
    peak_mib: float
    status: str

    @property
    def steps_per_second(self) -> float | None:
        if self.steps is None or self.seconds <= 0:
            return None
        return self.steps / self.seconds


def _input_of(program_path: Path) -> bytes:
    stdin_path = program_path.with_suffix(".in")
    return stdin_path.read_bytes() if stdin_path.exists() else b""


def _run_backend(program_path: Path, backend: str, max_steps: int | None,
                 batch: int | None = None) -> dict:  # fmt: skip
    """Run one program on one backend in this process and return the measurement as JSON.

    With `batch`, the torch backend runs that many copies of the program in lockstep
    (`tlc.runtime.torch_runner.run_batch`) and the steps are those of all copies.
    """
    from tlc.cli import load_program, select_backend

    program = load_program(str(program_path))
    stdin = _input_of(program_path)
    if batch is not None:
        from tlc.runtime import torch_runner

        torch_runner.load_model()  # build or load the weights outside the timed part
        started = time.perf_counter()
        results = torch_runner.run_batch([program] * batch, [stdin] * batch,
                                         max_steps=max_steps)  # fmt: skip
        seconds = time.perf_counter() - started
        statuses = {r.status.value for r in results}
        return {
            "steps": sum(r.steps for r in results),
            "tokens": sum(r.tokens for r in results),
            "seconds": seconds,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "status": statuses.pop() if len(statuses) == 1 else "mixed",
        }
    _, runner = select_backend(backend)

    started = time.perf_counter()
    result = runner(program, stdin=stdin, max_steps=max_steps)
    seconds = time.perf_counter() - started

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": seconds,
        "peak_mib": peak_kib / 1024.0,
        "status": result.status.value,
    }


def _measure_in_subprocess(program_path: Path, backend: str, max_steps: int | None,
                           batch: int | None = None) -> Measurement:  # fmt: skip
    command = [sys.executable, "-m", "tlc.runtime.bench", "--one", str(program_path), backend]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    if batch is not None:
        command += ["--batch", str(batch)]
        backend = f"{backend} x{batch}"
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines() or ["failed"]
        # A compile error ends with the source line and a caret; its first line names
        # the error.
        reason = next((line for line in lines if "error:" in line), lines[-1])
        return Measurement(program_path.name, backend, None, 0.0, 0.0, f"error: {reason}")
    row = json.loads(completed.stdout.strip().splitlines()[-1])
    return Measurement(
        program_path.name, backend, row["steps"], row["seconds"], row["peak_mib"], row["status"]
    )


def _measure_native(program_path: Path) -> Measurement:
    """Compile the program with gcc -O2 and time one run of the executable."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return Measurement(program_path.name, "gcc -O2", None, 0.0, 0.0, "error: gcc not found")
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "program"
        compiled = subprocess.run(
            [gcc, "-O2", "-fwrapv", "-w", "-x", "c", str(program_path), "-o", str(binary)],
            capture_output=True,
            text=True,
        )
        if compiled.returncode != 0:
            return Measurement(program_path.name, "gcc -O2", None, 0.0, 0.0, "error: gcc failed")
        started = time.perf_counter()
        try:
            ran = subprocess.run([str(binary)], input=_input_of(program_path),
                                 capture_output=True, timeout=NATIVE_TIMEOUT_SECONDS)  # fmt: skip
        except subprocess.TimeoutExpired:
            return Measurement(program_path.name, "gcc -O2", None, 0.0, 0.0,
                               f"error: timed out after {NATIVE_TIMEOUT_SECONDS} s")  # fmt: skip
        seconds = time.perf_counter() - started
    status = "native"
    if ran.returncode < 0:
        # The binary died of a signal (SIGFPE for a division by zero), where the model
        # traps; its time is still that of the native run.
        status = f"native, killed by {_signal_name(-ran.returncode)}"
    return Measurement(program_path.name, "gcc -O2", None, seconds, 0.0, status)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def format_table(rows: list[Measurement]) -> str:
    """Format measurements as a Markdown table, with each backend's speed relative to ref."""
    reference_speed = {
        row.program: row.steps_per_second
        for row in rows
        if row.backend == "ref" and row.steps_per_second
    }
    native_seconds = {row.program: row.seconds for row in rows if row.backend == "gcc -O2"}
    lines = [
        "| program | backend | steps | seconds | steps/s | vs ref | vs gcc -O2 time | peak MiB |"
        " status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        speed = row.steps_per_second
        versus_ref = ""
        if speed and reference_speed.get(row.program):
            ratio = speed / reference_speed[row.program]
            # Two significant digits below 0.1, so that slow backends do not show 0.00x.
            versus_ref = f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"
        versus_native = ""
        if row.backend != "gcc -O2" and native_seconds.get(row.program) and row.seconds > 0:
            times = row.seconds / native_seconds[row.program]
            if times >= 10:
                versus_native = f"{times:.0f}x slower"
            elif times >= 1:
                versus_native = f"{times:.1f}x slower"
            else:
                versus_native = f"{1 / times:.1f}x faster"
        lines.append(
            f"| {row.program} | {row.backend} | {row.steps if row.steps is not None else ''} "
            f"| {row.seconds:.3f} | {f'{speed:,.0f}' if speed else ''} | {versus_ref} "
            f"| {versus_native} | {row.peak_mib:.0f} | {row.status} |"
        )
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    """Run every benchmark program on every requested backend and print the table."""
    names = args.programs or [str(EXAMPLES / name) for name in DEFAULT_PROGRAMS]
    backends = list(BACKENDS)
    if args.backends is not None:
        backends = [backend.strip() for backend in args.backends.split(",")]
        if not all(backends):
            print(f"error: --backends {args.backends!r} has an empty name; give a "
                  f"comma-separated list of {', '.join(BACKENDS)}", file=sys.stderr)  # fmt: skip
            return 2
    unknown = [backend for backend in backends if backend not in BACKENDS]
    if unknown:
        print(f"error: unknown backend {', '.join(unknown)}; choose from "
              f"{', '.join(BACKENDS)}", file=sys.stderr)  # fmt: skip
        return 2
    if args.batch is not None and not 1 <= args.batch <= MAX_BATCH:
        print(f"error: --batch must be between 1 and {MAX_BATCH}, got {args.batch}",
              file=sys.stderr)  # fmt: skip
        return 2
    for name in names:
        path = Path(name)
        if not path.is_file():
            print(f"error: benchmark program not found: {path}", file=sys.stderr)
            return 2
        if path.suffix not in (".tl", ".tasm"):
            print(f"error: {path}: expected a .tl or .tasm file", file=sys.stderr)
            return 2
    rows: list[Measurement] = []
    for name in names:
        program_path = Path(name)
        for backend in backends:
            rows.append(_measure_in_subprocess(program_path, backend, args.max_steps))
        if args.batch is not None:
            rows.append(_measure_in_subprocess(program_path, "torch", args.max_steps, args.batch))
        if program_path.suffix == ".tl":
            rows.append(_measure_native(program_path))
    print(format_table(rows))
    failed = [row for row in rows if row.status.startswith("error")]
    return 1 if failed else 0


def _main() -> int:
    parser = argparse.ArgumentParser(description="Measure one program on one backend (internal).")
    parser.add_argument("--one", nargs=2, metavar=("PROGRAM", "BACKEND"), required=True)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    program, backend = args.one
    from tlc.cli import UsageError
    from tlc.compiler.errors import CompileError

    try:
        row = _run_backend(Path(program), backend, args.max_steps, args.batch)
    except CompileError as error:
        print(str(error).splitlines()[0], file=sys.stderr)
        return 1
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
