"""Measure the PyTorch runtime's decode rate for one program and for batches of copies.

For each batch size, builds the prompts and runs them, timed apart as the prompt pass.
Then it decodes every copy to its end in lockstep and prints the steps per second of
the decode loop by wall clock, and by this process's CPU time, which other jobs on the
machine disturb less. Every copy's outcome is checked against the reference
interpreter. Loading the model is not timed. The cache columns give the KV cache
entries of one copy at its end and their bytes (keys, values and positions, float64 and
int64), the memory that grows with the program's live state.

    .venv/bin/python benchmarks/torch_speed.py examples/hungarian.tl --batch 1,32,128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tlc.cli import load_program
from tlc.model import tokens as tk
from tlc.runtime import reference, torch_runner


def _arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", type=Path, help=".tl or .tasm file")
    parser.add_argument("--batch", default="1,32",
                        help="comma-separated batch sizes (default: 1,32)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(size) for size in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch must be comma-separated integers, got {args.batch!r}")
    if any(size < 1 for size in args.sizes):
        parser.error(f"every batch size must be at least 1, got {args.batch!r}")
    return args


def measure(model, program, stdin: bytes, expected, size: int) -> dict:
    """Run `size` copies of `program` in lockstep and return the timings and the cache
    sizes."""
    prompt = tk.encode_prompt(model.metadata, program, stdin)
    decoders = [tk.TokenDecoder(model.metadata, program) for _ in range(size)]
    batch = torch_runner.Batch(model.layers, size)
    started = time.perf_counter()
    tokens = model.prefill_many(batch, [prompt] * size)
    prompt_seconds = time.perf_counter() - started

    wall, cpu = time.perf_counter(), time.process_time()
    torch_runner.decode_lockstep(model, batch, decoders, tokens)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    for decoder in decoders:
        result = decoder.result
        if (result.status, result.steps, result.output) != (
            expected.status, expected.steps, expected.output
        ):
            raise SystemExit(f"a copy ended as {result.status.value} after {result.steps} "
                             f"steps, the reference as {expected.status.value} after "
                             f"{expected.steps}")  # fmt: skip

    entries = batch.cache_sizes(0)
    cache_bytes = 0
    for layer in batch.caches:
        for cache in layer:
            row = cache.keys.shape[2] + cache.values.shape[2] + 1
            cache_bytes += cache.sizes[0] * row * 8
    steps = expected.steps * size
    return {"prompt_seconds": prompt_seconds, "steps": steps, "wall": steps / wall,
            "cpu": steps / cpu, "entries": sum(entries), "cache_bytes": cache_bytes}  # fmt: skip


def main(argv=None) -> None:
    args = _arguments(argv)
    program = load_program(str(args.program))
    stdin_path = args.program.with_suffix(".in")
    stdin = stdin_path.read_bytes() if stdin_path.exists() else b""
    expected = reference.run_program(program, stdin=stdin)
    model = torch_runner.load_model()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, one thread")
    print("| program | batch | steps | prompt s | decode steps/s | decode steps/CPU s "
          "| cache entries | cache KiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        row = measure(model, program, stdin, expected, size)
        print(f"| {args.program.name} | {size} | {row['steps']:,} | "
              f"{row['prompt_seconds']:.2f} | {row['wall']:,.0f} | {row['cpu']:,.0f} | "
              f"{row['entries']:,} | {row['cache_bytes'] / 1024:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
