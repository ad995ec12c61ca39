"""Measure the reference interpreter's speed in executed instructions per second.

Runs each benchmark program (the `.tasm` files beside this script, or the ones given)
several times in this process and prints the best and the median rate. Only
`run_program` is timed; assembling is not.

    .venv/bin/python benchmarks/reference_speed.py [--repeat N] [PROGRAM.tasm ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from tlc.compiler.assembler import assemble
from tlc.runtime.machine import Status
from tlc.runtime.reference import run_program

BENCHMARKS = Path(__file__).resolve().parent


def measure(path: Path, repeat: int) -> tuple[int, list[float]]:
    """Run the program `repeat` times; return its step count and the rate of each run."""
    program = assemble(path.read_text(), str(path))
    rates = []
    steps = 0
    for _ in range(repeat):
        started = time.perf_counter()
        result = run_program(program)
        seconds = time.perf_counter() - started
        if result.status is not Status.HALTED:
            raise SystemExit(f"{path}: stopped with {result.status.value}, expected HALT")
        steps = result.steps
        rates.append(steps / seconds)
    return steps, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("programs", nargs="*", type=Path, help=".tasm files to run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per program")
    args = parser.parse_args()
    programs = args.programs or sorted(BENCHMARKS.glob("*.tasm"))
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"{'program':<20} {'steps':>10} {'best steps/s':>14} {'median steps/s':>16}")
    for path in programs:
        steps, rates = measure(path, args.repeat)
        best, median = max(rates), statistics.median(rates)
        print(f"{path.name:<20} {steps:>10} {best:>14,.0f} {median:>16,.0f}")


if __name__ == "__main__":
    main()
