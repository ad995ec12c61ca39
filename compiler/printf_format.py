"""Parsing printf format strings, which tlc expands into calls at compile time.

Supported: the conversions %d %i %u %x %X %c %s and %%, a decimal field width and the
flags `-` (left-justify) and `0` (pad numbers with zeros), which is what the stdlib's
print helpers implement. Anything else is a compile error that names the conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

CONVERSIONS = "diuxXcs"
# The argument kind each conversion expects.
INTEGER_CONVERSIONS = "diuxXc"
STRING_CONVERSIONS = "s"


class FormatError(ValueError):
    """A format the expansion does not support; `offset` is its byte in the string."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class Text:
    """Bytes copied to the output unchanged (`%%` included, as one `%`)."""

    data: bytes


@dataclass(frozen=True)
class Conversion:
    conversion: str  # one of CONVERSIONS
    width: int  # 0 when no width is given
    left: bool  # the `-` flag
    zero: bool  # the `0` flag
    offset: int  # byte offset of the `%` in the format string


Piece = Text | Conversion


def parse_format(data: bytes) -> list[Piece]:
    """Split a format string into text and conversions; raise FormatError when invalid."""
    pieces: list[Piece] = []
    text = bytearray()
    position = 0
    while position < len(data):
        byte = data[position]
        if byte != ord("%"):
            text.append(byte)
            position += 1
            continue
        if data[position + 1 : position + 2] == b"%":
            text.append(byte)
            position += 2
            continue
        conversion, position = _conversion(data, position)
        if text:
            pieces.append(Text(bytes(text)))
            text = bytearray()
        pieces.append(conversion)
    if text:
        pieces.append(Text(bytes(text)))
    return pieces


def _conversion(data: bytes, start: int) -> tuple[Conversion, int]:
    position = start + 1
    left = zero = False
    while position < len(data) and chr(data[position]) in "-0+ #":
        flag = chr(data[position])
        if flag == "-":
            left = True
        elif flag == "0":
            zero = True
        else:
            raise FormatError(f"printf flag '{flag}' is not supported; only '-' and '0' are",
                              start)
        position += 1
    width_start = position
    while position < len(data) and chr(data[position]).isdigit():
        position += 1
    width = int(data[width_start:position]) if position > width_start else 0
    if position >= len(data):
        raise FormatError("incomplete conversion at the end of the printf format", start)
    character = chr(data[position])
    if character == "*":
        raise FormatError("printf width '*' is not supported", start)
    if character == ".":
        raise FormatError("printf precision is not supported", start)
    if character in "lhjztL":
        raise FormatError(f"printf length modifier '{character}' is not supported; "
                          "arguments are int, unsigned or char *", start)
    if character not in CONVERSIONS:
        spelled = data[start : position + 1].decode("latin-1")
        raise FormatError(f"printf conversion '{spelled}' is not supported; use "
                          "%d %i %u %x %X %c %s or %%", start)
    if zero and character in "cs":
        raise FormatError(f"printf flag '0' with %{character} is not supported", start)
    return Conversion(character, width, left, zero and not left, start), position + 1
