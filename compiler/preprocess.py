"""The preprocessor: `#include` of the three stdlib headers and object-like `#define`.

It works on lines before the lexer runs. Each directive line is recorded and then
blanked, so every token keeps its line and column. Directive lines inside block comments
are left to the lexer, which skips them with the comment. Macro bodies are expanded
later, on tokens (see `parse.expand_macros`), from the line after their `#define` until
an `#undef`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tlc.compiler.astnodes import Span
from tlc.compiler.diagnostics import Reporter

# The headers a program may include; each maps to a file of the same name in stdlib/.
SUPPORTED_HEADERS = ("stdio.h", "stdlib.h", "string.h")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIRECTIVE = re.compile(r"\s*#\s*([A-Za-z_]*)")
_INCLUDE = re.compile(r"\s*(<[^>\n]*>|\"[^\"\n]*\")\s*$")


@dataclass
class Macro:
    """An object-like macro; `first_line` .. `last_line` are the lines it applies to."""

    name: str
    body: str
    span: Span  # the macro name in its #define
    body_column: int  # column of the body's first character in the #define line
    first_line: int
    last_line: int | None = None  # set by #undef


@dataclass
class Preprocessed:
    """The source text with directive lines blanked, the included headers and macros."""

    text: str
    includes: list[tuple[str, Span]] = field(default_factory=list)
    macros: list[Macro] = field(default_factory=list)


def preprocess(file: str, text: str, reporter: Reporter) -> Preprocessed:
    """Record and blank every directive line of `text`; report bad directives."""
    lines = text.split("\n")
    starts_in_comment, open_comment = _scan_comments(text)
    if open_comment is not None:
        line, column = open_comment
        reporter.error(Span(file, line, column), "unterminated comment")
    result = Preprocessed(text="")
    for index, line in enumerate(lines):
        if not starts_in_comment[index] and _DIRECTIVE.match(line):
            _directive(file, index + 1, line, result, reporter)
            lines[index] = ""
    result.text = "\n".join(lines)
    return result


def _scan_comments(text: str) -> tuple[list[bool], tuple[int, int] | None]:
    """Find which lines start inside a block comment, and an unterminated comment.

    Returns one flag per line and the (line, column) of a `/*` that is never closed.
    Quotes are followed so that a `/*` inside a string literal opens no comment.
    """
    starts_in_comment = [False]
    in_comment = False
    opened_at = (0, 0)
    quote = None
    line, line_start = 1, 0
    position = 0
    while position < len(text):
        character = text[position]
        pair = text[position : position + 2]
        if character == "\n":
            quote = None
            line, line_start = line + 1, position + 1
            starts_in_comment.append(in_comment)
        elif in_comment:
            if pair == "*/":
                in_comment = False
                position += 1
        elif quote is not None:
            if character == "\\" and text[position + 1 : position + 2] != "\n":
                position += 1
            elif character == quote:
                quote = None
        elif pair == "//":
            end = text.find("\n", position)
            position = len(text) if end < 0 else end
            continue
        elif pair == "/*":
            in_comment = True
            opened_at = (line, position - line_start + 1)
            position += 1
        elif character in "\"'":
            quote = character
        position += 1
    return starts_in_comment, opened_at if in_comment else None


def _strip_comments(text: str) -> str:
    """Remove the comments of a directive's text (block comments become a space)."""
    text = re.sub(r"/\*.*?\*/", " ", text)
    text = re.sub(r"/\*.*$", "", text)
    return re.sub(r"//.*$", "", text)


def _directive(file: str, line_number: int, line: str, result: Preprocessed,
               reporter: Reporter) -> None:
    match = _DIRECTIVE.match(line)
    assert match is not None
    name = match.group(1)
    rest = line[match.end() :]
    span = Span(file, line_number, line.index("#") + 1)
    if line.rstrip().endswith("\\"):
        reporter.error(span, "line continuation in a preprocessor directive is not supported")
        return
    if name == "":
        if _strip_comments(rest).strip():
            reporter.error(span, "invalid preprocessor directive")
        return
    if name == "include":
        _include(span, rest, result, reporter)
    elif name == "define":
        _define(file, line_number, match.end(), rest, result, reporter)
    elif name == "undef":
        _undef(span, line_number, rest, result, reporter)
    else:
        reporter.error(span, f"preprocessor directive '#{name}' is not supported")


def _include(span: Span, rest: str, result: Preprocessed, reporter: Reporter) -> None:
    match = _INCLUDE.match(_strip_comments(rest))
    if match is None:
        reporter.error(span, "#include expects <FILENAME>")
        return
    header = match.group(1)
    if header.startswith('"'):
        reporter.error(span, f"#include {header} is not supported; tlc provides only "
                       "<stdio.h>, <stdlib.h> and <string.h>")
        return
    name = header[1:-1].strip()
    if name not in SUPPORTED_HEADERS:
        reporter.error(span, f"header <{name}> is not supported; tlc provides only "
                       "<stdio.h>, <stdlib.h> and <string.h>")
        return
    if all(existing != name for existing, _ in result.includes):
        result.includes.append((name, span))


def _define(file: str, line_number: int, offset: int, rest: str, result: Preprocessed,
            reporter: Reporter) -> None:
    stripped = rest.lstrip()
    column = offset + len(rest) - len(stripped) + 1
    span = Span(file, line_number, column)
    match = _IDENTIFIER.match(stripped)
    if match is None:
        reporter.error(span, "macro name missing after #define")
        return
    name = match.group(0)
    after = stripped[match.end() :]
    if after.startswith("("):
        reporter.error(span, f"function-like macro '{name}' is not supported; only "
                       "object-like macros such as '#define N 10' are")
        return
    body = _strip_comments(after)
    body_column = column + match.end() + (len(body) - len(body.lstrip()))
    body = body.strip()
    previous = _active_macro(result, name)
    if previous is not None:
        if previous.body != body:
            reporter.error(span, f"macro '{name}' redefined with a different value")
        return
    result.macros.append(Macro(name, body, span, body_column, line_number + 1))


def _undef(span: Span, line_number: int, rest: str, result: Preprocessed,
           reporter: Reporter) -> None:
    match = _IDENTIFIER.fullmatch(_strip_comments(rest).strip())
    if match is None:
        reporter.error(span, "#undef expects a macro name")
        return
    macro = _active_macro(result, match.group(0))
    if macro is not None:
        macro.last_line = line_number


def _active_macro(result: Preprocessed, name: str) -> Macro | None:
    for macro in result.macros:
        if macro.name == name and macro.last_line is None:
            return macro
    return None
