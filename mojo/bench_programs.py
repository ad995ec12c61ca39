"""Time the Mojo runtime on programs run inside the universal interpreter model.

    python -m tlc.mojo.bench_programs benchmarks/nested_loops.tasm --repeat 3

For each program (.tasm or .tl), builds the prompt, runs the decode loop without
recording tokens and prints the steps per second of the best run, after checking that
the run ends as the reference interpreter's does. Building the model, packing it and
running the prompt are not timed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tlc.cli import UsageError, load_program
from tlc.compiler.errors import CompileError
from tlc.model import tokens
from tlc.mojo import runner
from tlc.runtime import reference


def _arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("programs", nargs="+", type=Path, help=".tasm or .tl files")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    return parser.parse_args(argv)


def time_program(path: Path, repeat: int) -> tuple[int, float]:
    """Return (steps, best seconds) of the decode loop of `path` on the Mojo runtime."""
    program = load_program(str(path))
    stdin_path = path.with_suffix(".in")
    stdin = stdin_path.read_bytes() if stdin_path.exists() else b""
    weights, packed = runner.load_universal()
    prompt = tokens.encode_prompt(weights.metadata, program, stdin)
    expected = reference.run_program(program, stdin=stdin)
    best = None
    for _ in range(repeat):
        with runner.MojoEngine(weights, packed) as engine:
            engine.feed(prompt)
            started = time.perf_counter()
            decoded = runner.decode(engine, None, record=False)
            seconds = time.perf_counter() - started
        if decoded.output != expected.output or decoded.token_count != expected.steps:
            raise SystemExit(f"{path}: the Mojo run differs from the reference interpreter")
        best = seconds if best is None else min(best, seconds)
    return decoded.token_count, best


def main(argv=None) -> None:
    args = _arguments(argv)
    for path in args.programs:
        try:
            steps, seconds = time_program(path, args.repeat)
        except CompileError as error:
            raise SystemExit(str(error)) from None
        except UsageError as error:
            raise SystemExit(f"error: {error}") from None
        print(f"{path}: steps={steps} seconds={seconds:.3f} "
              f"steps_per_second={steps / seconds:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
