"""Command-line interface of tlc: `tlc run`, `asm`, `ir`, `build`, `inspect` and `bench`.

`tlc FILE` is short for `tlc run FILE`. A user error prints a one-line `error: ...`, or the
located diagnostics of a compile error, and exits with a status from `tlc.runtime.machine`.
No user error prints a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import logging
import sys
import time
from pathlib import Path

from tlc.compiler.errors import CompileError
from tlc.runtime.machine import (
    EXIT_COMPILE_ERROR,
    EXIT_USAGE_ERROR,
    Program,
    RunResult,
    Status,
)

logger = logging.getLogger("tlc")
logger.addHandler(logging.NullHandler())

EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE of sysexits.h
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

COMMANDS = ("run", "asm", "ir", "build", "inspect", "bench")
BACKENDS = ("mojo", "torch", "ref")
BACKEND_MODULES = {
    "ref": "tlc.runtime.reference",
    "torch": "tlc.runtime.torch_runner",
    "mojo": "tlc.mojo.runner",
}
# Parts of tlc that the CLI imports only when a command needs them.
DRIVER_MODULE = "tlc.compiler.driver"  # compile_file(path) -> Program, ir_text(path) -> str
MODEL_COMMANDS_MODULE = "tlc.model.cli_commands"  # build_command(args), inspect_command(args)
BENCH_MODULE = "tlc.runtime.bench"  # bench_command(args)
SOURCE_SUFFIXES = (".tl", ".tasm")

# A run shows progress on a terminal once it has taken this long, refreshed this often.
PROGRESS_AFTER_SECONDS = 1.0
PROGRESS_EVERY_SECONDS = 0.5


class UsageError(Exception):
    """A problem with the command line or the environment: exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlc",
        description="Compile .tl (a C subset) or .tasm into transformer weights and run "
        "programs inside the model. `tlc FILE` is short for `tlc run FILE`.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parser(commands)
    asm = commands.add_parser("asm", help="print the .tasm text of a .tl or .tasm file")
    asm.add_argument("file", metavar="FILE")
    ir = commands.add_parser("ir", help="print the intermediate representation of a .tl file")
    ir.add_argument("file", metavar="FILE")
    build = commands.add_parser("build", help="write weights, program prompt and metadata")
    build.add_argument("file", metavar="FILE")
    build.add_argument("-o", "--output", metavar="OUT.safetensors", required=True,
                       help="path of the weight file to write")  # fmt: skip
    inspect_parser = commands.add_parser("inspect", help="describe a weight file")
    inspect_parser.add_argument("weights", metavar="W.safetensors")
    bench = commands.add_parser("bench", help="run the benchmark programs on every backend")
    bench.add_argument("programs", nargs="*", metavar="PROGRAM",
                       help="programs to run (default: the benchmark examples)")  # fmt: skip
    bench.add_argument("--backends", metavar="LIST",
                       help="comma-separated backends (default: all)")  # fmt: skip
    bench.add_argument("--max-steps", type=_positive_int, metavar="N",
                       help="stop each run after N executed instructions")  # fmt: skip
    bench.add_argument("--batch", type=_positive_int, metavar="N",
                       help="also run N copies of each program in one torch batch")  # fmt: skip
    return parser


def _add_run_parser(commands) -> None:
    run = commands.add_parser("run", help="run a .tl or .tasm program (the default command)")
    run.add_argument("file", metavar="FILE", help="a .tl or .tasm program")
    run.add_argument("--backend", choices=BACKENDS,
                     help="runtime to use (default: mojo when available, else torch)")
    run.add_argument("--max-steps", type=_positive_int, metavar="N",
                     help="stop with exit status 124 after N executed instructions")
    run.add_argument("--weights", metavar="W.safetensors",
                     help="run with these weights (torch and mojo backends)")
    run.add_argument("--stats", action="store_true",
                     help="print steps, seconds and steps per second on stderr")
    run.add_argument("--result", action="store_true",
                     help="print the top of the stack at HALT on stderr as result=N")
    run.add_argument("--trace", action="store_true",
                     help="print one line per executed instruction on stderr")
    run.add_argument("--memory-size", type=_positive_int, metavar="BYTES",
                     help="override the program's memory size in bytes")  # fmt: skip


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert `run` unless argv starts with a command or a top-level help option."""
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        return ["run", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the process exit status."""
    arguments = _with_default_command(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    if not arguments:
        parser.print_help(sys.stderr)
        return EXIT_USAGE_ERROR
    args = parser.parse_args(arguments)
    try:
        return _dispatch(args)
    except CompileError as error:
        print(str(error), file=sys.stderr)
        return EXIT_COMPILE_ERROR
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_BROKEN_PIPE
    except Exception as error:  # noqa: BLE001 - the last resort that keeps tracebacks away
        logger.debug("internal error", exc_info=True)
        print(f"error: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run_command(args)
    if args.command == "asm":
        return asm_command(args)
    if args.command == "ir":
        return ir_command(args)
    if args.command == "build":
        return _import(MODEL_COMMANDS_MODULE, "tlc build").build_command(args)
    if args.command == "inspect":
        return _import(MODEL_COMMANDS_MODULE, "tlc inspect").inspect_command(args)
    return _import(BENCH_MODULE, "tlc bench").bench_command(args)


def _import(module_name: str, feature: str):
    """Import a part of tlc that may not be built yet, as a UsageError when it is missing."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"{feature} is not available: {error}") from None


# --- loading programs ----------------------------------------------------------------


def _source_path(file: str) -> Path:
    path = Path(file)
    if path.suffix not in SOURCE_SUFFIXES:
        raise UsageError(f"{file}: unsupported file type; expected a .tl or .tasm file")
    if path.is_dir():
        raise UsageError(f"{file}: is a folder, not a .tl or .tasm file")
    if not path.is_file():
        raise UsageError(f"{file}: file not found")
    return path


def load_program(file: str) -> Program:
    """Assemble a .tasm file or compile a .tl file; compile errors raise CompileError."""
    path = _source_path(file)
    if path.suffix == ".tasm":
        from tlc.compiler.assembler import assemble

        return assemble(_read_text(path), file)
    driver = _import(DRIVER_MODULE, "the .tl compiler")
    return driver.compile_file(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})")
    except OSError as error:
        raise UsageError(f"{path}: cannot read file: {error.strerror}") from None


def asm_command(args: argparse.Namespace) -> int:
    from tlc.compiler.assembler import disassemble

    sys.stdout.write(disassemble(load_program(args.file)))
    return 0


def ir_command(args: argparse.Namespace) -> int:
    path = _source_path(args.file)
    if path.suffix != ".tl":
        raise UsageError(f"{args.file}: tlc ir needs a .tl file")
    driver = _import(DRIVER_MODULE, "the .tl compiler")
    text = driver.ir_text(path)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# --- running programs ----------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    program = load_program(args.file)
    if args.memory_size is not None:
        program = dataclasses.replace(program, memory_size=args.memory_size)
    try:
        program.validate()
    except ValueError as error:
        raise UsageError(f"{args.file}: {error}") from None
    name, run_program = select_backend(args.backend)
    options = _run_options(args, name, run_program, program)
    started = time.perf_counter()
    try:
        result = run_program(program, **options)
    except ValueError as error:
        # The runners raise ValueError for an invalid weight file and for a program that
        # uses an opcode the model does not compute.
        _clear_progress(options)
        raise UsageError(str(error)) from None
    seconds = time.perf_counter() - started
    _clear_progress(options)
    sys.stdout.flush()
    _report(args, program, result, name, seconds)
    return result.exit_status


def select_backend(requested: str | None):
    """Return (name, run_program) of the requested backend, or of the default one."""
    if requested is None:
        requested = "mojo" if _mojo_available() else "torch"
    try:
        module = importlib.import_module(BACKEND_MODULES[requested])
    except ImportError as error:
        raise UsageError(f"backend '{requested}' is not available: {error}") from None
    is_available = getattr(module, "is_available", None)
    if is_available is not None and not is_available():
        raise UsageError(f"backend '{requested}' is not available on this machine")
    return requested, module.run_program


def _mojo_available() -> bool:
    try:
        runner = importlib.import_module(BACKEND_MODULES["mojo"])
        return bool(runner.is_available())
    except Exception:  # noqa: BLE001 - any failure means: use the torch backend
        logger.debug("mojo backend unavailable", exc_info=True)
        return False


def _run_options(args, backend: str, run_program, program: Program) -> dict:
    options: dict = {"stdin": _read_stdin(program), "max_steps": args.max_steps}
    options["write_output"] = _write_stdout
    if args.trace:
        options["trace"] = _write_trace_line
    if backend == "ref":
        if args.weights is not None:
            raise UsageError("--weights needs the torch or mojo backend")
    else:
        options["weights"] = args.weights
    accepts_progress = "progress" in inspect.signature(run_program).parameters
    if accepts_progress and not args.trace and sys.stderr.isatty():
        options["progress"] = _ProgressLine()
    return options


def _read_stdin(program: Program) -> bytes:
    """Read all of stdin up front, unless it is a terminal and the program never reads."""
    stream = sys.stdin
    if stream is None or stream.closed:
        return b""
    if stream.isatty() and not program.reads_input:
        return b""
    return stream.buffer.read()


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _write_trace_line(line: str) -> None:
    sys.stderr.write(line + "\n")


class _ProgressLine:
    """Shows `steps=N steps_per_second=R` on one terminal line while a long run goes on."""

    def __init__(self):
        self.started = time.perf_counter()
        self.last_shown = self.started
        self.shown = False

    def __call__(self, steps: int) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        if elapsed < PROGRESS_AFTER_SECONDS or now - self.last_shown < PROGRESS_EVERY_SECONDS:
            return
        self.last_shown = now
        self.shown = True
        rate = steps / elapsed
        sys.stderr.write(f"\rsteps={steps} steps_per_second={rate:.0f} ")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _clear_progress(options: dict) -> None:
    progress = options.get("progress")
    if progress is not None:
        progress.clear()


def _report(args, program: Program, result: RunResult, backend: str, seconds: float) -> None:
    """Print the trap or step-limit message, then --result, then --stats as the last line."""
    if result.status is Status.TRAPPED:
        print(_trap_message(program, result), file=sys.stderr)
    elif result.status is Status.STEP_LIMIT:
        print(f"error: step limit of {args.max_steps} reached", file=sys.stderr)
    if args.result and result.status is Status.HALTED:
        result_text = "none" if result.result is None else str(result.result)
        print(f"result={result_text}", file=sys.stderr)
    if args.stats:
        rate = result.steps / seconds if seconds > 0 else 0.0
        line = (
            f"steps={result.steps} seconds={seconds:.6f} steps_per_second={rate:.0f} "
            f"backend={backend}"
        )
        if result.tokens is not None:
            line += f" tokens={result.tokens}"
        print(line, file=sys.stderr)


def _trap_message(program: Program, result: RunResult) -> str:
    reason = result.trap.value if result.trap is not None else "unknown"
    message = f"trap: {reason} at ip={result.trap_ip}"
    ip = result.trap_ip
    if ip is not None and 0 <= ip < len(program.instructions):
        line = program.instructions[ip].line
        if line is not None:
            message += f" ({program.source_name} line {line})"
    return message
