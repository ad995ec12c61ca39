"""Constant folding with C's rules on 32-bit values.

A folded value is the mathematical value in its type: negative for a signed type that
holds a negative number, 0 .. 2^32 - 1 for unsigned int. Operations that trap on the
machine (division by zero, INT_MIN / -1) are not folded, so they still trap at run time
unless C requires a constant there, in which case the caller reports the error. Shift
counts are taken mod 32, as the machine's shift instructions do.
"""

from __future__ import annotations

from tlc.compiler import typesys as ts
from tlc.compiler.isa import WORD_MASK

SIGN_BIT = 1 << 31


def convert(value: int, ctype: ts.Type) -> int:
    """Convert `value` to `ctype` as C does: wrap modulo 2^width, or test for _Bool."""
    if ctype == ts.BOOL or (isinstance(ctype, ts.IntType) and ctype.name == "_Bool"):
        return int(value != 0)
    if isinstance(ctype, ts.IntType):
        bits = 8 * ctype.size
        value &= (1 << bits) - 1
        if ctype.signed and value >= 1 << (bits - 1):
            value -= 1 << bits
        return value
    return value & WORD_MASK  # pointers


def pattern(value: int) -> int:
    """Return the 32-bit pattern of a folded value."""
    return value & WORD_MASK


def fold_unary(op: str, value: int, result_type: ts.Type) -> int:
    if op == "-":
        return convert(-value, result_type)
    if op == "+":
        return convert(value, result_type)
    if op == "~":
        return convert(~value, result_type)
    assert op == "!"
    return int(value == 0)


def fold_binary(op: str, left: int, right: int, operation_type: ts.Type) -> int | None:
    """Fold `left op right` computed in `operation_type`; None when it would trap."""
    signed = ts.is_signed(operation_type)
    if op in ("<", ">", "<=", ">=", "==", "!="):
        return _compare(op, left, right)
    if op in ("/", "%"):
        return _divide(op, left, right, operation_type, signed)
    if op == "<<":
        return convert(left << (right & 31), operation_type)
    if op == ">>":
        count = right & 31
        source = left if signed else pattern(left)
        return convert(source >> count, operation_type)
    results = {
        "+": lambda: left + right,
        "-": lambda: left - right,
        "*": lambda: left * right,
        "&": lambda: left & right,
        "|": lambda: left | right,
        "^": lambda: left ^ right,
    }
    return convert(results[op](), operation_type)


def _compare(op: str, left: int, right: int) -> int:
    results = {
        "<": left < right,
        ">": left > right,
        "<=": left <= right,
        ">=": left >= right,
        "==": left == right,
        "!=": left != right,
    }
    return int(results[op])


def _divide(op: str, left: int, right: int, operation_type: ts.Type, signed: bool
            ) -> int | None:
    if right == 0:
        return None
    if signed and left == -SIGN_BIT and right == -1:
        return None if op == "/" else 0
    quotient = abs(left) // abs(right)
    if (left < 0) != (right < 0):
        quotient = -quotient
    if op == "/":
        return convert(quotient, operation_type)
    return convert(left - right * quotient, operation_type)
