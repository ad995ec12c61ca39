"""The one compile-error type of tlc and its printer.

Every stage (assembler, preprocessor, parser, checker, code generator) reports problems
as `Diagnostic`s and raises `CompileError` with all the diagnostics it collected. The CLI
prints `str(error)` and exits with status 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnostic:
    """A located error message. `line` and `column` count from 1."""

    file: str
    line: int
    column: int
    message: str
    source_line: str | None = None

    def render(self) -> str:
        """Format as `FILE:LINE:COL: error: MESSAGE`, then the source line and a caret."""
        text = f"{self.file}:{self.line}:{self.column}: error: {self.message}"
        if self.source_line is not None:
            source = self.source_line.rstrip("\r\n").expandtabs(1)
            caret = " " * max(self.column - 1, 0) + "^"
            text += f"\n{source}\n{caret}"
        return text


def diagnostic_at(file: str, source: str, line: int, column: int, message: str) -> Diagnostic:
    """Build a diagnostic and attach line `line` of `source` for the caret display."""
    lines = source.splitlines()
    source_line = lines[line - 1] if 1 <= line <= len(lines) else None
    return Diagnostic(file, line, column, message, source_line)


class CompileError(Exception):
    """One or more diagnostics that stop compilation."""

    def __init__(self, diagnostics: list[Diagnostic]):
        if not diagnostics:
            raise ValueError("CompileError needs at least one diagnostic")
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        """Format every diagnostic, one block each."""
        return "\n".join(d.render() for d in self.diagnostics)

    def __str__(self) -> str:
        return self.render()
