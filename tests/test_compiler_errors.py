"""Compile errors: a table of bad programs with the expected line, column and message.

Each case checks the first diagnostic; the rendered text must have the
`FILE:LINE:COL: error: message` form with the source line and a caret.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tlc.compiler.driver import compile_file, compile_source
from tlc.compiler.errors import CompileError

MAIN = "int main(void) {\n    return 0;\n}\n"

# (id, source, line, column, message fragment)
ERROR_CASES = [
    ("missing semicolon", "int main(void) {\n    int x = 1\n    return x;\n}\n",
     3, 5, "expected ';' or ',' before 'return'"),
    ("missing operand", "int main(void) {\n    return (1 + ;\n}\n", 2, 17,
     "expected expression before ';'"),
    ("missing brace", "int main(void) {\n    return 0;\n", 2, 14,
     "expected a statement or '}' at end of input"),
    ("missing paren of if", "int main(void) {\n    if 1) return 1;\n    return 0;\n}\n",
     2, 8, "expected '(' before numeric constant"),
    ("undeclared identifier", "int main(void) {\n    return y + 1;\n}\n", 2, 12,
     "'y' undeclared"),
    ("global redefinition", "int x = 1;\nint x = 2;\n" + MAIN, 2, 5, "redefinition of 'x'"),
    ("local redefinition", "int main(void) {\n    int a;\n    int a;\n    return 0;\n}\n",
     3, 9, "redefinition of 'a'"),
    ("function redefinition", "int f(void) { return 1; }\nint f(void) { return 2; }\n" + MAIN,
     2, 5, "redefinition of 'f'"),
    ("conflicting types", "int f(int a);\nint f(char *a) { return 0; }\n" + MAIN, 2, 5,
     "conflicting types for 'f'"),
    ("too few arguments", "int f(int a, int b) { return a; }\n"
     "int main(void) {\n    return f(1);\n}\n", 3, 12, "too few arguments to function 'f'"),
    ("too many arguments", "int f(int a) { return a; }\n"
     "int main(void) {\n    return f(1, 2);\n}\n", 3, 12, "too many arguments"),
    ("non-lvalue assignment", "int main(void) {\n    int a = 1, b = 2;\n    a + b = 3;\n"
     "    return 0;\n}\n", 3, 11, "lvalue required as left operand of assignment"),
    ("assignment to constant", "int main(void) {\n    5 = 1;\n    return 0;\n}\n", 2, 7,
     "lvalue required"),
    ("assignment to array", "int main(void) {\n    int a[2], b[2];\n    a = b;\n"
     "    return 0;\n}\n", 3, 7, "assignment to expression with array type"),
    ("assignment to const", "const int k = 1;\nint main(void) {\n    k = 2;\n    return 0;\n}\n",
     3, 7, "assignment of read-only location 'k'"),
    ("break outside loop", "int main(void) {\n    break;\n}\n", 2, 5,
     "break statement not within a loop or switch"),
    ("continue outside loop", "int main(void) {\n    switch (1) { default: continue; }\n}\n",
     2, 27, "continue statement not within a loop"),
    ("return value from void", "void f(void) {\n    return 1;\n}\n" + MAIN, 2, 5,
     "'return' with a value, in function 'f' returning void"),
    ("return without value", "int f(void) {\n    return;\n}\n" + MAIN, 2, 5,
     "'return' with no value"),
    ("missing main", "int f(void) {\n    return 0;\n}\n", 1, 1, "no 'main' function"),
    ("undefined function", "int g(int x);\nint main(void) {\n    return g(1);\n}\n", 3, 12,
     "undefined reference to 'g'"),
    ("implicit declaration", "int main(void) {\n    puts(\"x\");\n    return 0;\n}\n", 2, 5,
     "implicit declaration of function 'puts'; include <stdio.h>"),
    ("decimal literal too large", "int main(void) {\n    return 2147483648;\n}\n", 2, 12,
     "too large for int"),
    ("hex literal too large", "int main(void) {\n    return 0x100000000;\n}\n", 2, 12,
     "too large for unsigned int"),
    ("decimal literal past unsigned",
     "int main(void) {\n    return 99999999999999999999;\n}\n", 2, 12,
     "too large for unsigned int"),
    ("long suffix", "int main(void) {\n    return 1L;\n}\n", 2, 12, "'long' is not supported"),
    ("invalid octal", "int main(void) {\n    return 08;\n}\n", 2, 12,
     "invalid digit '8' in octal constant"),
    ("unterminated string", "int main(void) {\n    char *s = \"abc;\n    return 0;\n}\n",
     2, 15, 'missing terminating " character'),
    ("unterminated char", "int main(void) {\n    int c = 'a;\n    return 0;\n}\n", 2, 13,
     "missing terminating ' character"),
    ("unterminated comment", "int main(void) {\n    /* open\n    return 0;\n}\n", 2, 5,
     "unterminated comment"),
    ("stray character", "int main(void) {\n    return 1 @ 2;\n}\n", 2, 14,
     "stray '@' in program"),
    ("non-ASCII identifier", "int main(void) {\n    int \u00e9 = 1;\n    return 0;\n}\n", 2, 9,
     "invalid character U+00E9"),
    ("float type", "int main(void) {\n    float x;\n    return 0;\n}\n", 2, 5,
     "'float' is not supported"),
    ("double type", "double d;\n" + MAIN, 1, 1, "'double' is not supported"),
    ("long type", "int main(void) {\n    long x;\n    return 0;\n}\n", 2, 5,
     "'long' is not supported"),
    ("float constant", "int main(void) {\n    return 1.5;\n}\n", 2, 12,
     "floating-point constants are not supported"),
    ("struct", "struct point { int x; };\n" + MAIN, 1, 1, "'struct' is not supported"),
    ("union", "union u { int x; };\n" + MAIN, 1, 1, "'union' is not supported"),
    ("typedef", "typedef int number;\n" + MAIN, 1, 1, "'typedef' is not supported"),
    ("enum", "enum color { RED };\n" + MAIN, 1, 1, "'enum' is not supported"),
    ("goto", "int main(void) {\n    goto end;\n}\n", 2, 5, "'goto' is not supported"),
    ("label", "int main(void) {\nend:\n    return 0;\n}\n", 2, 1, "labels are not supported"),
    ("function pointer", "int f(int x) { return x; }\nint main(void) {\n"
     "    int (*p)(int);\n    return 0;\n}\n", 3, 10, "function pointers are not supported"),
    ("function as value", "int f(void) { return 1; }\nint main(void) {\n    int x = f;\n"
     "    return x;\n}\n", 3, 13, "function pointers are not supported"),
    ("member access", "int main(void) {\n    int a = 0;\n    return a.x;\n}\n", 3, 13,
     "member access is not supported"),
    ("variadic function", "int f(int a, ...);\n" + MAIN, 1, 5,
     "variadic functions are not supported"),
    ("unsupported header", "#include <math.h>\n" + MAIN, 1, 1,
     "header <math.h> is not supported"),
    ("function-like macro", "#define TWICE(x) (2 * (x))\n" + MAIN, 1, 9,
     "function-like macro 'TWICE' is not supported"),
    ("conditional directive", "#ifdef X\n" + MAIN, 1, 1, "'#ifdef' is not supported"),
    ("printf non-literal format", "#include <stdio.h>\nchar *f = \"%d\";\n"
     "int main(void) {\n    printf(f, 1);\n    return 0;\n}\n", 4, 5,
     "format of printf must be a string literal"),
    ("printf float conversion", "#include <stdio.h>\nint main(void) {\n"
     "    printf(\"%f\\n\", 1);\n    return 0;\n}\n", 3, 12,
     "printf conversion '%f' is not supported"),
    ("printf argument count", "#include <stdio.h>\nint main(void) {\n"
     "    printf(\"%d %d\\n\", 1);\n    return 0;\n}\n", 3, 5,
     "has 2 conversions but 1 arguments"),
    ("printf string argument", "#include <stdio.h>\nint main(void) {\n"
     "    printf(\"%s\\n\", 5);\n    return 0;\n}\n", 3, 20, "%s expects 'char *'"),
    ("incompatible pointer", "int main(void) {\n    int x;\n    char *p = &x;\n"
     "    return 0;\n}\n", 3, 15, "incompatible pointer types"),
    ("pointer from integer", "int main(void) {\n    int *p = 5;\n    return 0;\n}\n", 2, 14,
     "makes a pointer from an integer"),
    ("sizeof pointer", "int main(void) {\n    int *p;\n    return sizeof p;\n}\n", 3, 12,
     "pointers are 4 bytes in tlc"),
    ("void value", "void f(void) {}\nint main(void) {\n    return f() + 1;\n}\n", 3, 12,
     "void value not ignored"),
    ("dereference non-pointer", "int main(void) {\n    int x = 1;\n    return *x;\n}\n", 3, 12,
     "invalid type argument of unary '*'"),
    ("duplicate case", "int main(void) {\n    switch (1) { case 1: case 1: break; }\n"
     "    return 0;\n}\n", 2, 26, "duplicate case value 1"),
    ("case outside switch", "int main(void) {\n    case 1: return 0;\n}\n", 2, 5,
     "'case' label not within a switch statement"),
    ("non-constant case", "int main(void) {\n    int x = 1;\n    switch (x) { case x: break; }"
     "\n    return 0;\n}\n", 3, 23, "case label is not an integer constant"),
    ("non-constant array size", "int n = 3;\nint a[n];\n" + MAIN, 2, 7,
     "array size is not an integer constant"),
    ("negative array size", "int a[-2];\n" + MAIN, 1, 7, "array size must be positive"),
    ("excess initializers", "int a[2] = {1, 2, 3};\n" + MAIN, 1, 19,
     "excess elements in array initializer"),
    ("string too long", "char s[2] = \"abc\";\n" + MAIN, 1, 13, "too long"),
    ("non-constant global initializer", "int x = 1;\nint y = x;\n" + MAIN, 2, 9,
     "not a compile-time constant"),
    ("main with parameters", "int main(int argc) {\n    return 0;\n}\n", 1, 5,
     "'main' must take no parameters"),
    ("void variable", "void v;\n" + MAIN, 1, 6, "variable 'v' declared void"),
    ("unknown escape", "int main(void) {\n    return '\\q';\n}\n", 2, 12,
     "unknown escape sequence '\\q'"),
    ("multi-character constant", "int main(void) {\n    return 'ab';\n}\n", 2, 12,
     "multi-character character constant"),
    ("bad type combination", "int main(void) {\n    unsigned char int x;\n    return 0;\n}\n",
     2, 5, "two or more data types"),
]


def first_diagnostic(source: str):
    with pytest.raises(CompileError) as caught:
        compile_source(source, "bad.tl")
    return caught.value.diagnostics[0], str(caught.value)


@pytest.mark.parametrize("case", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_error_location_and_message(case):
    _, source, line, column, fragment = case
    diagnostic, _ = first_diagnostic(source)
    assert diagnostic.message.find(fragment) >= 0, diagnostic.message
    assert (diagnostic.line, diagnostic.column) == (line, column)


def test_error_rendering_has_source_line_and_caret():
    _, text = first_diagnostic("int main(void) {\n    return y;\n}\n")
    lines = text.splitlines()
    assert lines[0] == "bad.tl:2:12: error: 'y' undeclared"
    assert lines[1] == "    return y;"
    assert lines[2] == "           ^"


def test_independent_errors_are_collected():
    source = ("int main(void) {\n    int a = b;\n    int c = d;\n    break;\n"
              "    return e;\n}\n")
    with pytest.raises(CompileError) as caught:
        compile_source(source, "bad.tl")
    lines = [d.line for d in caught.value.diagnostics]
    assert lines == [2, 3, 4, 5]


def test_invalid_utf8_byte(tmp_path: Path):
    path = tmp_path / "bytes.tl"
    path.write_bytes(b"int main(void) {\n    return \xff;\n}\n")
    with pytest.raises(CompileError) as caught:
        compile_file(path)
    diagnostic = caught.value.diagnostics[0]
    assert "invalid byte 0xff" in diagnostic.message
    assert (diagnostic.line, diagnostic.column) == (2, 12)


def test_nul_byte_is_invalid_character():
    diagnostic, _ = first_diagnostic("int main(void) {\n    return 0;\x00\n}\n")
    assert "invalid character U+0000" in diagnostic.message


@pytest.mark.parametrize("depth", [3000])
def test_deep_parentheses_compile(depth: int):
    source = "int main(void) { return " + "(" * depth + "7" + ")" * depth + "; }\n"
    program = compile_source(source, "deep.tl")
    assert program.instructions


def test_deep_unary_chain_compiles():
    source = "int main(void) { int x = 3; return " + "-(" * 2000 + "x" + ")" * 2000 + "; }\n"
    program = compile_source(source, "deep.tl")
    assert program.instructions


@pytest.mark.slow
def test_nesting_beyond_limit_fails_cleanly():
    depth = 150_000
    source = "int main(void) { int x = 3; return " + "-(" * depth + "x" + ")" * depth + "; }\n"
    with pytest.raises(CompileError) as caught:
        compile_source(source, "deep.tl")
    assert "nests too deeply" in str(caught.value)


def test_cli_compile_error_exit_status(tmp_path: Path):
    path = tmp_path / "bad.tl"
    path.write_text("int main(void) {\n    return y;\n}\n")
    completed = subprocess.run([sys.executable, "-m", "tlc", "run", "--backend", "ref",
                                str(path)], capture_output=True, text=True)
    assert completed.returncode == 1
    assert f"{path}:2:12: error: 'y' undeclared" in completed.stderr
    assert "Traceback" not in completed.stderr
