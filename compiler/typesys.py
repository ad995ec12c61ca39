"""The C types of .tl and C's rules for them: sizes, promotions and usual conversions.

Every scalar is at most 32 bits wide, and pointers are 32-bit byte addresses, so every
value fits one machine word. A value on the operand stack is always kept in the
canonical 32-bit form of its type: sign-extended for `char` and `short`, zero-extended
for `unsigned char`, `unsigned short` and `_Bool` (which is 0 or 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tlc.compiler.isa import Opcode

POINTER_SIZE = 4


@dataclass(frozen=True)
class IntType:
    """An integer type; `rank` orders types for C's integer conversion rank."""

    name: str
    size: int
    signed: bool
    rank: int
    const: bool = False


@dataclass(frozen=True)
class VoidType:
    const: bool = False


@dataclass(frozen=True)
class PointerType:
    target: Type
    const: bool = False


@dataclass(frozen=True)
class ArrayType:
    element: Type
    length: int | None  # None for an array of unknown size, such as `int a[]`
    const: bool = False


@dataclass(frozen=True)
class FunctionType:
    result: Type
    params: tuple[Type, ...]
    variadic: bool = False
    const: bool = False


@dataclass(frozen=True)
class ErrorType:
    """The type of an expression that already has an error, so no second error follows."""

    const: bool = False


Type = IntType | VoidType | PointerType | ArrayType | FunctionType | ErrorType

BOOL = IntType("_Bool", 1, False, 1)
CHAR = IntType("char", 1, True, 2)
UCHAR = IntType("unsigned char", 1, False, 2)
SHORT = IntType("short", 2, True, 3)
USHORT = IntType("unsigned short", 2, False, 3)
INT = IntType("int", 4, True, 4)
UINT = IntType("unsigned int", 4, False, 4)
VOID = VoidType()
ERROR = ErrorType()

# NOTE: C gives sizeof the type size_t and a pointer difference the type ptrdiff_t,
# which are 64 bits wide under gcc on x86-64. tlc uses unsigned int and int, so
# arithmetic that wraps such a value below zero and then divides, shifts or compares it
# with a 64-bit range in mind can differ from gcc.
SIZE_TYPE = UINT
PTRDIFF_TYPE = INT


def unqualified(ctype: Type) -> Type:
    return replace(ctype, const=False) if ctype.const else ctype


def strip_qualifiers(ctype: Type) -> Type:
    """Return `ctype` with const removed at every level, for compatibility checks."""
    if isinstance(ctype, PointerType):
        return PointerType(strip_qualifiers(ctype.target))
    if isinstance(ctype, ArrayType):
        return ArrayType(strip_qualifiers(ctype.element), ctype.length)
    if isinstance(ctype, FunctionType):
        return FunctionType(strip_qualifiers(ctype.result),
                            tuple(strip_qualifiers(p) for p in ctype.params), ctype.variadic)
    return unqualified(ctype)


def is_integer(ctype: Type) -> bool:
    return isinstance(ctype, IntType)


def is_pointer(ctype: Type) -> bool:
    return isinstance(ctype, PointerType)


def is_scalar(ctype: Type) -> bool:
    return isinstance(ctype, (IntType, PointerType))


def is_error(ctype: Type) -> bool:
    return isinstance(ctype, ErrorType)


def is_void(ctype: Type) -> bool:
    return isinstance(ctype, VoidType)


def is_signed(ctype: Type) -> bool:
    """Return whether comparisons, division and right shifts of `ctype` are signed."""
    return isinstance(ctype, IntType) and ctype.signed


def promote(ctype: Type) -> Type:
    """Apply C's integer promotions: every type of lower rank than int becomes int."""
    if isinstance(ctype, IntType):
        return UINT if ctype.rank >= INT.rank and not ctype.signed else INT
    return ctype


def usual_arithmetic(left: Type, right: Type) -> Type:
    """Return the common type of two integer operands: unsigned int wins over int."""
    if promote(left) == UINT or promote(right) == UINT:
        return UINT
    return INT


def size_of(ctype: Type) -> int | None:
    """Return the size in bytes, or None for void, functions and arrays of unknown size."""
    if isinstance(ctype, IntType):
        return ctype.size
    if isinstance(ctype, PointerType):
        return POINTER_SIZE
    if isinstance(ctype, ArrayType):
        element = size_of(ctype.element)
        if element is None or ctype.length is None:
            return None
        return element * ctype.length
    return None


def alignment_of(ctype: Type) -> int:
    if isinstance(ctype, ArrayType):
        return alignment_of(ctype.element)
    size = size_of(ctype)
    return size if size in (1, 2, 4) else 4


def contains_pointer(ctype: Type) -> bool:
    if isinstance(ctype, PointerType):
        return True
    if isinstance(ctype, ArrayType):
        return contains_pointer(ctype.element)
    return False


def decay(ctype: Type) -> Type:
    """Convert an array to a pointer to its first element, as C does for array values."""
    if isinstance(ctype, ArrayType):
        return PointerType(ctype.element)
    return ctype


def scalar_width(ctype: Type) -> int:
    """Return the bytes a scalar occupies in memory (1, 2 or 4)."""
    size = size_of(ctype)
    assert size in (1, 2, 4), f"{type_text(ctype)} is not a scalar"
    return size


def load_opcode(ctype: Type) -> Opcode:
    """Return the load that reads a value of `ctype` from memory in canonical form."""
    size = scalar_width(ctype)
    if size == 4:
        return Opcode.I32_LOAD
    if size == 2:
        return Opcode.I32_LOAD16_S if is_signed(ctype) else Opcode.I32_LOAD16_U
    return Opcode.I32_LOAD8_S if is_signed(ctype) else Opcode.I32_LOAD8_U


def store_opcode(ctype: Type) -> Opcode:
    return {4: Opcode.I32_STORE, 2: Opcode.I32_STORE16, 1: Opcode.I32_STORE8}[
        scalar_width(ctype)
    ]


def type_text(ctype: Type) -> str:
    """Spell `ctype` as C does in messages: `int`, `const char *`, `int [3]`."""
    prefix, suffix = _type_parts(ctype)
    return (prefix + (" " + suffix if suffix else "")).strip()


def _type_parts(ctype: Type) -> tuple[str, str]:
    const = "const " if ctype.const else ""
    if isinstance(ctype, IntType):
        return const + ctype.name, ""
    if isinstance(ctype, VoidType):
        return const + "void", ""
    if isinstance(ctype, ErrorType):
        return "<error>", ""
    if isinstance(ctype, PointerType):
        prefix, suffix = _type_parts(ctype.target)
        star = "*" + (" const" if ctype.const else "")
        if suffix:
            return prefix, f"({star}){suffix}"
        return prefix + " " + star, ""
    if isinstance(ctype, ArrayType):
        prefix, suffix = _type_parts(ctype.element)
        length = "" if ctype.length is None else str(ctype.length)
        return prefix, f"[{length}]{suffix}"
    assert isinstance(ctype, FunctionType)
    prefix, suffix = _type_parts(ctype.result)
    params = ", ".join(type_text(p) for p in ctype.params) or "void"
    return prefix, f"({params}){suffix}"


def with_const(ctype: Type) -> Type:
    """Return `ctype` const-qualified; for an array, its elements are const."""
    if isinstance(ctype, ArrayType):
        return ArrayType(with_const(ctype.element), ctype.length)
    return replace(ctype, const=True)


def is_const_object(ctype: Type) -> bool:
    """Return whether an lvalue of this type is read-only."""
    if isinstance(ctype, ArrayType):
        return is_const_object(ctype.element)
    return ctype.const
