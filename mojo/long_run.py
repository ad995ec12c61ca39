"""Compare the PyTorch and Mojo runtimes token for token over one long run.

    python -m tlc.mojo.long_run benchmarks/collatz_long.tl

Runs the program inside the same model on both runtimes, from the same prompt, and
compares every generated token: each token becomes a 64-bit fingerprint, and the first
position where the fingerprints differ is reported.
Both runs are also decoded and checked against the reference interpreter's outcome.
The exit status is 0 when everything agrees, 1 when something differs and 2 for an
invalid program, input or weight file.

The fingerprint of a token t is sum_f m_f t_f mod 2^64 with fixed random odd
multipliers m_f. Two tokens that differ in exactly one field always get different
fingerprints, because m_f is odd and the difference of the field values is below
2^63. Tokens that differ in several fields collide only if their weighted difference
is a multiple of 2^64.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlc.model import tokens as tk
from tlc.runtime.machine import Program, RunResult

FINGERPRINT_SEED = 20261204
MOJO_CHUNK = 1 << 16
TORCH_PROGRESS_EVERY = 100_000


@dataclass
class RuntimeRun:
    """The fingerprints and outcome of one runtime's run, and its decode time."""

    fingerprints: np.ndarray  # (tokens,) uint64
    result: RunResult
    seconds: float


@dataclass
class Comparison:
    """The outcome of comparing two runs token for token."""

    tokens: int  # tokens compared (the shorter run's length)
    first_difference: int | None  # index of the first differing token, None if none
    lengths: tuple[int, int]


def multipliers(field_count: int) -> np.ndarray:
    """Return the fixed odd 64-bit multipliers of the fingerprint."""
    generator = np.random.default_rng(FINGERPRINT_SEED)
    values = generator.integers(0, 1 << 63, size=field_count, dtype=np.uint64)
    return values * np.uint64(2) + np.uint64(1)


def fingerprints(token_rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return one uint64 fingerprint per row of `token_rows` (n, F)."""
    rows = np.ascontiguousarray(token_rows).astype(np.uint64)
    # Unsigned integer arrays wrap modulo 2^64 in numpy, which is the hash's arithmetic.
    return (rows * weights).sum(axis=1, dtype=np.uint64)


def compare(first: np.ndarray, second: np.ndarray) -> Comparison:
    """Compare two fingerprint sequences and find the first position where they differ.

    When one sequence is a prefix of the other, the first difference is the shorter
    one's length.
    """
    shared = min(len(first), len(second))
    differing = np.flatnonzero(first[:shared] != second[:shared])
    if len(differing):
        index = int(differing[0])
    elif len(first) != len(second):
        index = shared
    else:
        index = None
    return Comparison(shared, index, (len(first), len(second)))


def run_torch(metadata_source, program: Program, stdin: bytes, max_steps: int | None,
              log=None) -> RuntimeRun:  # fmt: skip
    """Decode `program` on the PyTorch runtime, one token at a time."""
    from tlc.runtime import torch_runner

    model = torch_runner.load_model(metadata_source)
    weights = multipliers(model.field_count)
    prompt = tk.encode_prompt(model.metadata, program, stdin)
    decoder = tk.TokenDecoder(model.metadata, program, max_steps=max_steps)
    collected: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    started = time.perf_counter()
    with torch_runner._OneThread():
        model.reset()
        token = model.prefill(prompt)
        while True:
            pending.append(token)
            if len(pending) == TORCH_PROGRESS_EVERY:
                collected.append(fingerprints(np.stack(pending), weights))
                pending.clear()
                if log is not None:
                    count = sum(len(part) for part in collected)
                    rate = count / (time.perf_counter() - started)
                    log(f"torch: {count} tokens, {rate:.0f} tokens/s")
            if not decoder.feed(token):
                break
            token = model.step_one(model.state, 0, token)
    seconds = time.perf_counter() - started
    if pending:
        collected.append(fingerprints(np.stack(pending), weights))
    return RuntimeRun(np.concatenate(collected), decoder.result, seconds)


def run_mojo(metadata_source, program: Program, stdin: bytes,
             max_steps: int | None) -> RuntimeRun:  # fmt: skip
    """Decode `program` on the Mojo runtime in recorded chunks."""
    from tlc.mojo import runner

    if metadata_source is None:
        model, packed = runner.load_universal()
    else:
        model, packed = runner.load_packed(metadata_source)
    weights = multipliers(len(model.fields))
    prompt = tk.encode_prompt(model.metadata, program, stdin)
    decoder = tk.TokenDecoder(model.metadata, program, max_steps=max_steps)
    collected: list[np.ndarray] = []
    seconds = 0.0
    running = True
    with runner.MojoEngine(model, packed) as engine:
        engine.feed(prompt)
        count = 0
        while running:
            size = MOJO_CHUNK if max_steps is None else min(MOJO_CHUNK, max_steps - count)
            started = time.perf_counter()
            chunk = engine.generate(size, record=True)
            seconds += time.perf_counter() - started
            if chunk.emitted == 0:
                break
            index = 0
            # The decoder ends the run at the same token as the torch loop: a stop
            # token or the step limit, whichever comes first.
            for index, token in enumerate(chunk.tokens):
                if not decoder.feed(token):
                    running = False
                    break
            decoded = chunk.tokens[: index + 1]
            count += len(decoded)
            collected.append(fingerprints(decoded, weights))
            if chunk.stopped:
                running = False
    return RuntimeRun(np.concatenate(collected), decoder.result, seconds)


def _arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", type=Path, help=".tl or .tasm file")
    parser.add_argument("--stdin", type=Path, default=None,
                        help="file whose bytes are the program's input (default: "
                             "PROGRAM.in when it exists, else empty)")  # fmt: skip
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop both runs after this many executed instructions")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weight file to run (default: the universal weights)")
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    return args


def _load(args: argparse.Namespace) -> tuple[Program, bytes]:
    """Return the program and its input. Raises UsageError or CompileError."""
    from tlc.cli import UsageError, load_program

    program = load_program(str(args.program))
    stdin_path = args.stdin or args.program.with_suffix(".in")
    if args.stdin is None and not stdin_path.exists():
        return program, b""
    try:
        return program, stdin_path.read_bytes()
    except OSError as error:
        raise UsageError(f"{stdin_path}: cannot read file: {error.strerror}") from None


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from tlc.cli import UsageError
    from tlc.compiler.errors import CompileError

    args = _arguments(argv)
    try:
        program, stdin = _load(args)
    except CompileError as error:
        print(str(error), file=sys.stderr)
        return 2
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return _compare(args, program, stdin)
    except ValueError as error:  # an invalid weight file, or an opcode it does not compute
        print(f"error: {error}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace, program: Program, stdin: bytes) -> int:
    """Run the reference, Mojo and torch, print the summary line and return the status.
    Raises ValueError for an invalid weight file or an opcode the model does not
    compute."""
    from tlc.model.weights import uncovered_opcodes
    from tlc.runtime import reference, torch_runner

    metadata = torch_runner.load_model(args.weights).metadata
    missing = uncovered_opcodes(metadata, program)
    if missing:
        raise ValueError(f"the model does not compute {', '.join(missing)}")
    log = _log

    expected = reference.run_program(program, stdin=stdin, max_steps=args.max_steps)
    log(f"reference: {expected.status.name} after {expected.steps} steps")
    mojo = run_mojo(args.weights, program, stdin, args.max_steps)
    log(f"mojo: {len(mojo.fingerprints)} tokens in {mojo.seconds:.1f} s")
    torch_run = run_torch(args.weights, program, stdin, args.max_steps, log)
    log(f"torch: {len(torch_run.fingerprints)} tokens in {torch_run.seconds:.1f} s")

    comparison = compare(torch_run.fingerprints, mojo.fingerprints)
    failures = []
    if comparison.first_difference is not None:
        failures.append(f"the token streams differ first at token "
                        f"{comparison.first_difference} (lengths torch "
                        f"{comparison.lengths[0]}, mojo {comparison.lengths[1]})")  # fmt: skip
    for name, run in (("torch", torch_run), ("mojo", mojo)):
        if _outcome(run.result) != _outcome(expected):
            failures.append(f"{name} ends as {_outcome(run.result)}, the reference "
                            f"interpreter as {_outcome(expected)}")  # fmt: skip
    print(f"program={args.program} tokens={comparison.tokens} "
          f"steps={expected.steps} identical={not failures} "
          f"torch_seconds={torch_run.seconds:.1f} mojo_seconds={mojo.seconds:.2f}")  # fmt: skip
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _outcome(result: RunResult) -> tuple:
    return (result.status, result.steps, result.output, result.result, result.trap)


if __name__ == "__main__":
    sys.exit(main())
