"""Collecting located errors across the stages of one compilation.

A `Reporter` stores the text of every source file of the compilation (the program and the
stdlib headers and sources it pulls in), so that each diagnostic shows its source line
and a caret. Stages call `error` for problems they can continue past, `fatal` for those
they cannot, and `check` at the end of a stage.
"""

from __future__ import annotations

from tlc.compiler.astnodes import Span
from tlc.compiler.errors import CompileError, Diagnostic, diagnostic_at

# Independent errors reported before compilation stops; more add noise, not insight.
MAX_ERRORS = 20


class Reporter:
    """Diagnostics of one compilation and the source texts they point into."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}
        self.diagnostics: list[Diagnostic] = []

    def add_source(self, name: str, text: str) -> None:
        self.sources[name] = text

    def diagnostic(self, span: Span, message: str) -> Diagnostic:
        text = self.sources.get(span.file, "")
        return diagnostic_at(span.file, text, span.line, span.column, message)

    def error(self, span: Span, message: str) -> None:
        """Record an error and continue; stop once MAX_ERRORS have been recorded."""
        self.diagnostics.append(self.diagnostic(span, message))
        if len(self.diagnostics) >= MAX_ERRORS:
            raise CompileError(self.diagnostics)

    def fatal(self, span: Span, message: str) -> CompileError:
        """Return the error that stops compilation here, with the errors recorded so far."""
        return CompileError([*self.diagnostics, self.diagnostic(span, message)])

    def check(self) -> None:
        """Raise the recorded errors, if any, in source order."""
        if self.diagnostics:
            ordered = sorted(self.diagnostics, key=lambda d: (d.file, d.line, d.column))
            raise CompileError(ordered)
