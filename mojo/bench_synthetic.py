"""Time the Mojo runtime on a random synthetic model of a chosen size.

    python -m tlc.mojo.bench_synthetic --scratch 1000 --layers 8 --tokens 20000

Prints the model's size (width, layers, nonzero weights) and the decoding speed in
tokens per second, without recording tokens, best of `--repeat` runs. Only the decode
loop is timed: loading the file, packing it and running the prompt are not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tlc.mojo import runner, synthetic
from tlc.mojo.synthetic import SyntheticSpec
from tlc.mojo.weights import load_weights


def _arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=int, default=1000, help="free residual dimensions")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dense-heads", type=int, default=2, help="brute-force heads per layer")
    parser.add_argument("--exact-heads", type=int, default=2, help="exact-match heads per layer")
    parser.add_argument("--key-bits", type=int, default=8, help="n of the exact-match keys")
    parser.add_argument("--shared-hidden", type=int, default=256, help="shared block neurons")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer")
    parser.add_argument("--expert-hidden", type=int, default=128, help="neurons per expert")
    parser.add_argument("--density", type=float, default=0.01,
                        help="fraction of nonzero entries in each random matrix")
    parser.add_argument("--tokens", type=int, default=20000, help="tokens to decode per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def _spec(args: argparse.Namespace) -> SyntheticSpec:
    return SyntheticSpec(
        key_bits=args.key_bits,
        scratch=args.scratch,
        layers=args.layers,
        dense_heads=args.dense_heads,
        exact_heads=args.exact_heads,
        shared_hidden=args.shared_hidden,
        experts=args.experts,
        expert_hidden=args.expert_hidden,
        density=args.density,
        never_halt=True,  # so every run decodes exactly --tokens tokens
    )


def nonzero_count(weights) -> int:
    """Return the number of stored matrix entries in the model."""
    total = sum(len(m.values) for m in weights.embed + weights.unembed)
    for layer in weights.layers:
        for head in layer.heads:
            total += sum(len(m.values) for m in (head.wq, head.wk, head.wv, head.wo))
        blocks = ([layer.shared] if layer.shared else []) + layer.experts
        total += sum(len(b.w1.values) + len(b.w2.values) for b in blocks)
        if layer.router_w is not None:
            total += len(layer.router_w.values)
    return total


def main(argv=None) -> None:
    args = _arguments(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = synthetic.write_model(Path(folder) / "bench.safetensors", _spec(args), args.seed, 64)
        weights = load_weights(path)
    print(f"width={weights.width} layers={len(weights.layers)} "
          f"nonzero_weights={nonzero_count(weights)}")  # fmt: skip
    packed = runner.pack_model(weights)
    best = None
    for _ in range(args.repeat):
        with runner.MojoEngine(weights, packed) as engine:
            engine.feed(weights.prompt)
            started = time.perf_counter()
            decoded = runner.decode(engine, args.tokens, record=False)
            seconds = time.perf_counter() - started
        rate = decoded.token_count / seconds
        best = rate if best is None else max(best, rate)
        print(f"tokens={decoded.token_count} seconds={seconds:.3f} tokens_per_second={rate:.0f}")
    print(f"best tokens_per_second={best:.0f}")


if __name__ == "__main__":
    main()
