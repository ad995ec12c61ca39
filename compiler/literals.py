"""Integer, character and string literals: C's spelling rules and the values they denote.

tlc has no `long`, so an integer constant must fit `int` or `unsigned int`. C gives an
unsuffixed decimal constant the first of int, long, long long that fits its value, and an
unsuffixed hexadecimal or octal constant the first of int, unsigned int, long, ...; a
constant that would need `long` is rejected rather than silently narrowed.
"""

from __future__ import annotations

INT_MAX = 2**31 - 1
UINT_MAX = 2**32 - 1

_SIMPLE_ESCAPES = {
    "n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, "'": 39, '"': 34, "?": 63,
    "a": 7, "b": 8, "f": 12, "v": 11,
}  # fmt: skip


class LiteralError(ValueError):
    """A malformed literal; the message is the compile error."""


def parse_integer(text: str) -> tuple[int, bool]:
    """Return the value of integer constant `text` and whether its type is unsigned."""
    body = text.rstrip("uUlL")
    suffix = text[len(body) :]
    if "l" in suffix.lower():
        raise LiteralError(f"integer constant '{text}' has a long suffix; 'long' is not "
                           "supported")
    if suffix.lower() not in ("", "u"):
        raise LiteralError(f"invalid suffix '{suffix}' on integer constant")
    value, decimal = _digits_value(text, body)
    if suffix:
        if value > UINT_MAX:
            raise LiteralError(f"integer constant '{text}' is too large for unsigned int")
        return value, True
    if value <= INT_MAX:
        return value, False
    if value > UINT_MAX:
        raise LiteralError(f"integer constant '{text}' is too large for unsigned int "
                           "('long' is not supported)")
    if decimal:
        raise LiteralError(f"integer constant '{text}' is too large for int; write "
                           f"'{text}u' for an unsigned constant ('long' is not supported)")
    return value, True


def _digits_value(text: str, body: str) -> tuple[int, bool]:
    """Return the value of the digits and whether they are decimal."""
    if body[:2].lower() == "0x":
        digits, base, name = body[2:], 16, "hexadecimal"
    elif body.startswith("0") and len(body) > 1:
        digits, base, name = body[1:], 8, "octal"
    else:
        digits, base, name = body, 10, "decimal"
    if not digits:
        raise LiteralError(f"invalid integer constant '{text}'")
    for digit in digits:
        if not digit.isascii() or not digit.isalnum() or int(digit, 36) >= base:
            raise LiteralError(f"invalid digit '{digit}' in {name} constant '{text}'")
    return int(digits, base), base == 10


def decode_character(token: str) -> int:
    """Return the int value of a character constant such as 'a' or '\\n'.

    `char` is signed, so a byte of 128 or more gives a negative value, as gcc on x86.
    """
    data = _decode_body(token[1:-1], "'")
    if not data:
        raise LiteralError("empty character constant")
    if len(data) > 1:
        raise LiteralError(f"multi-character character constant {token} is not supported")
    byte = data[0]
    return byte - 256 if byte >= 128 else byte


def decode_string(token: str) -> bytes:
    """Return the bytes of a string literal token, without the terminating NUL.

    Characters outside ASCII are stored as their UTF-8 bytes.
    """
    return bytes(_decode_body(token[1:-1], '"'))


def _decode_body(body: str, quote: str) -> bytearray:
    data = bytearray()
    position = 0
    while position < len(body):
        character = body[position]
        if character != "\\":
            data += character.encode("utf-8")
            position += 1
            continue
        value, position = _escape(body, position + 1)
        data.append(value)
    return data


def _escape(body: str, position: int) -> tuple[int, int]:
    """Decode the escape sequence that starts after the backslash at `position`."""
    character = body[position]
    if character in "01234567":
        end = position
        while end < len(body) and end < position + 3 and body[end] in "01234567":
            end += 1
        value = int(body[position:end], 8)
        if value > 255:
            raise LiteralError(f"octal escape sequence '\\{body[position:end]}' is out of "
                               "range")
        return value, end
    if character == "x":
        end = position + 1
        while end < len(body) and body[end] in "0123456789abcdefABCDEF":
            end += 1
        if end == position + 1:
            raise LiteralError("\\x used with no following hex digits")
        value = int(body[position + 1 : end], 16)
        if value > 255:
            raise LiteralError(f"hex escape sequence '\\{body[position:end]}' is out of "
                               "range")
        return value, end
    if character in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[character], position + 1
    raise LiteralError(f"unknown escape sequence '\\{character}'")
