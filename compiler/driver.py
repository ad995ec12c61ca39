"""The compiler driver: .tl source to a Program, one stage after the other.

    preprocess -> parse -> check -> lower to IR -> optimize -> link with the stdlib
    -> lay out memory -> generate stack code

The stdlib units (stdlib/*.tl) go through the same stages once per process. The whole
compilation runs in a thread with a large stack, so that deeply nested source compiles.
Nesting beyond even that limit is a compile error, never a RecursionError.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from importlib import resources
from os import PathLike
from pathlib import Path

from tlc.compiler import ir
from tlc.compiler.astnodes import Span
from tlc.compiler.check import CheckedUnit, check_unit
from tlc.compiler.codegen import CodeGenerator
from tlc.compiler.diagnostics import Reporter
from tlc.compiler.errors import CompileError
from tlc.compiler.ir_print import format_unit
from tlc.compiler.link import DataTooLarge, UndefinedFunction, lay_out, link
from tlc.compiler.lower import lower_unit
from tlc.compiler.optimize import optimize_unit
from tlc.compiler.parse import parse_file
from tlc.compiler.preprocess import Macro, preprocess
from tlc.runtime.machine import Program

logger = logging.getLogger("tlc.compiler")

LIBRARY_SOURCES = ("stdio.tl", "stdlib.tl", "string.tl")
LIBRARY_PREFIX = "stdlib/"  # file names of the stdlib in diagnostics and IR
# The compiler recurses once or twice per level of source nesting.
RECURSION_LIMIT = 200_000
THREAD_STACK_BYTES = 512 * 1024 * 1024


def compile_source(source: str, name: str) -> Program:
    """Compile .tl source text; `name` is the file name used in diagnostics."""
    return _run_deep(_compile, source, name)


def compile_file(path: str | PathLike) -> Program:
    """Compile a .tl file; every problem with the program raises CompileError."""
    name = str(path)
    return compile_source(read_source(name, Path(path).read_bytes()), name)


def ir_text(path: str | PathLike) -> str:
    """Return the linked, optimized IR of a .tl file as `tlc ir` prints it."""
    name = str(path)
    source = read_source(name, Path(path).read_bytes())
    unit, _, _ = _run_deep(_linked_unit, source, name)
    return f"; IR of {name} linked with the stdlib functions it calls\n" + format_unit(unit)


def read_source(name: str, data: bytes) -> str:
    """Decode a source file as UTF-8; an invalid byte is a located compile error."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        before = data[: error.start]
        line = before.count(b"\n") + 1
        column = error.start - (before.rfind(b"\n") + 1) + 1
        text = data.decode("utf-8", errors="replace")
        reporter = Reporter()
        reporter.add_source(name, text)
        bad = data[error.start]
        raise reporter.fatal(Span(name, line, column),
                             f"invalid byte 0x{bad:02x} in source (not UTF-8)") from None


def _run_deep(function, *args):
    """Run `function(*args)` in a thread with a large stack and recursion limit."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # re-raised in the calling thread
            outcome["error"] = error

    previous_limit = sys.getrecursionlimit()
    previous_stack = threading.stack_size(THREAD_STACK_BYTES)
    try:
        sys.setrecursionlimit(max(previous_limit, RECURSION_LIMIT))
        thread = threading.Thread(target=target, name="tlc-compile")
        try:
            thread.start()
        except RuntimeError:
            # No thread with a large stack here (a tight address-space limit): compile in
            # this thread, where deep nesting fails sooner but still as a compile error.
            logger.debug("cannot start the compile thread", exc_info=True)
            sys.setrecursionlimit(previous_limit)
            target()
        else:
            thread.join()
    finally:
        threading.stack_size(previous_stack)
        sys.setrecursionlimit(previous_limit)
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, RecursionError):
            name = args[1] if len(args) > 1 else "<source>"
            raise CompileError([Reporter().diagnostic(
                Span(name, 1, 1), "program nests too deeply to compile")]) from None
        raise error
    return outcome["value"]


# --- stages ---------------------------------------------------------------------------


def _front_end(source: str, name: str, reporter: Reporter, library: str | None
               ) -> CheckedUnit:
    """Preprocess, parse and check one unit with the headers it includes."""
    reporter.add_source(name, source)
    preprocessed = preprocess(name, source, reporter)
    headers = []
    macros: list[Macro] = []
    for header, span in preprocessed.includes:
        header_name = LIBRARY_PREFIX + header
        header_text = _library_text(header)
        reporter.add_source(header_name, header_text)
        header_pp = preprocess(header_name, header_text, reporter)
        headers.append(parse_file(header_name, header_pp.text, header_pp.macros, reporter))
        for macro in header_pp.macros:
            macros.append(Macro(macro.name, macro.body, macro.span, macro.body_column,
                                span.line + 1))
    reporter.check()
    macros.extend(preprocessed.macros)
    unit = parse_file(name, preprocessed.text, macros, reporter)
    return check_unit(unit, headers, reporter, library=library)


def _library_text(file: str) -> str:
    return resources.files("tlc.stdlib").joinpath(file).read_text(encoding="utf-8")


@functools.cache
def library_units() -> tuple[ir.Unit, ...]:
    """Compile the stdlib sources once per process."""
    units = []
    for file in LIBRARY_SOURCES:
        reporter = Reporter()
        name = LIBRARY_PREFIX + file
        checked = _front_end(_library_text(file), name, reporter, library=file[:-3])
        units.append(optimize_unit(lower_unit(checked, reporter, file[:-3], library=True)))
    return tuple(units)


def _linked_unit(source: str, name: str) -> tuple[ir.Unit, bool, CheckedUnit]:
    reporter = Reporter()
    checked = _front_end(source, name, reporter, library=None)
    unit = optimize_unit(lower_unit(checked, reporter, "", library=False))
    libraries = library_units()
    try:
        linked, reads_input = link(unit, list(libraries))
    except UndefinedFunction as error:
        raise reporter.fatal(_use_site(checked, error.name, name),
                             _undefined_message(error.name)) from None
    return linked, reads_input, checked


def _use_site(checked: CheckedUnit, function_name: str, file: str) -> Span:
    for function in checked.functions:
        if function.link_name == function_name:
            return function.first_call or function.span
    return Span(file, 1, 1)


def _undefined_message(name: str) -> str:
    if name == "main":
        return "program has no 'main' function"
    return f"undefined reference to '{name}': it is declared but never defined"


def _compile(source: str, name: str) -> Program:
    linked, reads_input, checked = _linked_unit(source, name)
    try:
        layout = lay_out(linked)
    except DataTooLarge as error:
        raise Reporter().fatal(Span(name, 1, 1), f"the program's data needs {error.size} "
                               "bytes, more than the machine's memory can hold") from None
    library_files = frozenset(LIBRARY_PREFIX + file for file in LIBRARY_SOURCES)
    generator = CodeGenerator(linked, layout.addresses, layout.stack_pointer, library_files)
    instructions, functions = generator.generate()
    program = Program(
        instructions=instructions,
        data=layout.segments,
        memory_size=layout.memory_size,
        source_name=name,
        labels=functions,
        reads_input=reads_input,
    )
    try:
        program.validate()
    except ValueError as error:
        raise Reporter().fatal(Span(name, 1, 1), f"the compiled program is invalid: "
                               f"{error}") from None
    logger.debug("compiled %s: %d instructions, %d data bytes", name, len(instructions),
                 sum(len(data) for _, data in layout.segments))
    return program
