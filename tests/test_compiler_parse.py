"""Parser unit tests: precedence, associativity, dangling else, casts, declarators and
literals, checked on the AST."""

from __future__ import annotations

import pytest

from tlc.compiler import astnodes as ast
from tlc.compiler.diagnostics import Reporter
from tlc.compiler.literals import LiteralError, decode_character, decode_string, parse_integer
from tlc.compiler.parse import parse_file
from tlc.compiler.preprocess import preprocess


def parse(source: str) -> ast.TranslationUnit:
    reporter = Reporter()
    reporter.add_source("test.tl", source)
    preprocessed = preprocess("test.tl", source, reporter)
    return parse_file("test.tl", preprocessed.text, preprocessed.macros, reporter)


def shape(node) -> str:
    """Write an expression fully parenthesised, to show how it was grouped."""
    if isinstance(node, ast.Name):
        return node.name
    if isinstance(node, ast.IntLiteral):
        return node.text
    if isinstance(node, ast.Binary):
        return f"({shape(node.left)} {node.op} {shape(node.right)})"
    if isinstance(node, ast.Assign):
        return f"({shape(node.target)} {node.op} {shape(node.source)})"
    if isinstance(node, ast.Unary):
        return f"({node.op}{shape(node.operand)})"
    if isinstance(node, ast.IncDec):
        return f"({node.op}{shape(node.operand)})" if node.prefix else (
            f"({shape(node.operand)}{node.op})")
    if isinstance(node, ast.Cast):
        return f"(cast {shape(node.operand)})"
    if isinstance(node, ast.Conditional):
        return f"({shape(node.condition)} ? {shape(node.then)} : {shape(node.otherwise)})"
    if isinstance(node, ast.Comma):
        return f"({shape(node.left)}, {shape(node.right)})"
    if isinstance(node, ast.Index):
        return f"{shape(node.base)}[{shape(node.index)}]"
    if isinstance(node, ast.Call):
        return f"{shape(node.callee)}({', '.join(shape(a) for a in node.args)})"
    if isinstance(node, ast.SizeofExpr):
        return f"(sizeof {shape(node.operand)})"
    if isinstance(node, ast.SizeofType):
        return "(sizeof type)"
    raise AssertionError(type(node).__name__)


def expression(text: str) -> str:
    unit = parse(f"int main(void) {{ return {text}; }}")
    return shape(unit.items[0].body.items[0].value)


GROUPING_CASES = [
    ("1 - 2 - 3", "((1 - 2) - 3)"),
    ("2 + 3 * 4", "(2 + (3 * 4))"),
    ("2 * 3 + 4", "((2 * 3) + 4)"),
    ("8 / 4 / 2", "((8 / 4) / 2)"),
    ("a = b = c", "(a = (b = c))"),
    ("a += b -= c", "(a += (b -= c))"),
    ("-x++", "(-(x++))"),
    ("-x--", "(-(x--))"),
    ("++x++", "(++(x++))"),
    ("*p++", "(*(p++))"),
    ("!a == b", "((!a) == b)"),
    ("a < b == c < d", "((a < b) == (c < d))"),
    ("a & b == c", "(a & (b == c))"),
    ("a | b ^ c & d", "(a | (b ^ (c & d)))"),
    ("a || b && c", "(a || (b && c))"),
    ("1 << 2 + 3", "(1 << (2 + 3))"),
    ("a ? b : c ? d : e", "(a ? b : (c ? d : e))"),
    ("a ? b, c : d", "(a ? (b, c) : d)"),
    ("a = 1, b = 2", "((a = 1), (b = 2))"),
    ("(int) x + 1", "((cast x) + 1)"),
    ("(int) -x", "(cast (-x))"),
    ("(x) - 1", "(x - 1)"),
    ("(x)(1)", "x(1)"),
    ("sizeof x + 1", "((sizeof x) + 1)"),
    ("sizeof (int) + 1", "((sizeof type) + 1)"),
    ("a[i][j]", "a[i][j]"),
    ("f(a, b)[2]", "f(a, b)[2]"),
    ("- - x", "(-(-x))"),
    ("~!x", "(~(!x))"),
    ("&a[1]", "(&a[1])"),
]


@pytest.mark.parametrize("text, grouped", GROUPING_CASES, ids=[c[0] for c in GROUPING_CASES])
def test_expression_grouping(text: str, grouped: str):
    assert expression(text) == grouped


def test_dangling_else_binds_to_inner_if():
    unit = parse("int main(void) { if (a) if (b) x = 1; else x = 2; return 0; }")
    outer = unit.items[0].body.items[0]
    assert isinstance(outer, ast.If)
    assert outer.otherwise is None
    assert isinstance(outer.then, ast.If)
    assert outer.then.otherwise is not None


def test_cast_versus_parenthesised_name():
    unit = parse("int main(void) { return (char) y + (y) + (y)[0]; }")
    tree = unit.items[0].body.items[0].value
    assert isinstance(tree.left.left, ast.Cast)
    assert isinstance(tree.left.right, ast.Name)
    assert isinstance(tree.right, ast.Index)


def test_operator_spans_point_at_operator():
    unit = parse("int main(void) { return a +\n  b; }")
    binary = unit.items[0].body.items[0].value
    assert (binary.span.line, binary.span.column) == (1, 27)
    assert (binary.right.span.line, binary.right.span.column) == (2, 3)


def test_declarator_nesting():
    unit = parse("int *a[3]; int (*b)[4]; int m[2][5];")
    pointer_array = unit.items[0].items[0].declarator
    array_pointer = unit.items[1].items[0].declarator
    matrix = unit.items[2].items[0].declarator
    assert isinstance(pointer_array, ast.PointerDeclarator)
    assert isinstance(pointer_array.inner, ast.ArrayDeclarator)
    assert isinstance(array_pointer, ast.ArrayDeclarator)
    assert isinstance(array_pointer.inner, ast.ParenDeclarator)
    assert matrix.size.text == "5"
    assert matrix.inner.size.text == "2"


def test_macro_expansion_takes_use_site_position():
    unit = parse("#define LIMIT (4 + 5)\nint main(void) {\n  return LIMIT;\n}\n")
    value = unit.items[0].body.items[0].value
    assert shape(value) == "(4 + 5)"
    assert (value.span.line, value.span.column) == (3, 10)


def test_macro_applies_after_its_definition_until_undef():
    unit = parse("int a = N;\n#define N 3\nint b = N;\n#undef N\nint c = N;\n")
    values = [item.items[0].init for item in unit.items]
    assert [type(v).__name__ for v in values] == ["Name", "IntLiteral", "Name"]


def test_string_concatenation():
    unit = parse('char *s = "ab" "c\\n";')
    assert unit.items[0].items[0].init.data == b"abc\n"


INTEGER_CASES = [
    ("0", 0, False), ("42", 42, False), ("2147483647", 2147483647, False),
    ("0x7fffffff", 0x7FFFFFFF, False), ("0x80000000", 0x80000000, True),
    ("0xFFFFFFFF", 0xFFFFFFFF, True), ("017", 15, False), ("10u", 10, True),
    ("4294967295U", 4294967295, True),
]  # fmt: skip


@pytest.mark.parametrize("text, value, is_unsigned", INTEGER_CASES,
                         ids=[c[0] for c in INTEGER_CASES])
def test_integer_literal(text: str, value: int, is_unsigned: bool):
    assert parse_integer(text) == (value, is_unsigned)


@pytest.mark.parametrize("text", ["2147483648", "0x100000000", "4294967296u", "1l", "09",
                                  "0x", "12ab"])
def test_invalid_integer_literal(text: str):
    with pytest.raises(LiteralError):
        parse_integer(text)


def test_character_escapes():
    assert decode_character("'a'") == 97
    assert decode_character("'\\n'") == 10
    assert decode_character("'\\0'") == 0
    assert decode_character("'\\377'") == -1
    assert decode_character("'\\x41'") == 65
    assert decode_character("'\\''") == 39


def test_string_escapes_and_utf8():
    assert decode_string('"a\\tb\\\\\\"\\x7f"') == b'a\tb\\"\x7f'
    assert decode_string('"\u00e9"') == "\u00e9".encode("utf-8")
