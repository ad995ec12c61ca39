"""The parser: tokens from the Lark lexer, macro expansion, then an LALR parse into the AST.

`parse_file` runs the three steps on preprocessed text. The Lark parser is built once per
process from grammar.lark. Its callbacks (`AstBuilder`) build AST nodes while the LALR
parser reduces, so no parse tree is kept and parsing does not recurse, however deeply
the source nests.
"""

from __future__ import annotations

import functools
import logging
import threading
from importlib import resources

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from tlc.compiler import astnodes as ast
from tlc.compiler.astnodes import Span
from tlc.compiler.diagnostics import Reporter
from tlc.compiler.literals import (
    LiteralError,
    decode_character,
    decode_string,
    parse_integer,
)
from tlc.compiler.preprocess import Macro

logger = logging.getLogger("tlc.compiler")

# The builders of one parser instance share state (file name, reporter), so parses are
# serialized.
_PARSE_LOCK = threading.Lock()


@functools.cache
def _parser() -> tuple[Lark, AstBuilder]:
    grammar = resources.files("tlc.compiler").joinpath("grammar.lark").read_text()
    builder = AstBuilder()
    parser = Lark(
        grammar,
        parser="lalr",
        lexer="basic",
        keep_all_tokens=True,
        transformer=builder,
        maybe_placeholders=False,
    )
    return parser, builder


def parse_file(file: str, text: str, macros: list[Macro], reporter: Reporter
               ) -> ast.TranslationUnit:
    """Lex `text` (already preprocessed), expand `macros` and parse it into the AST."""
    with _PARSE_LOCK:
        parser, builder = _parser()
        tokens = tokenize(parser, file, text, reporter)
        tokens = expand_macros(parser, tokens, macros, reporter)
        builder.start_file(file, reporter)
        return _parse_tokens(parser, file, tokens, reporter)


# --- lexing ---------------------------------------------------------------------------


def tokenize(parser: Lark, file: str, text: str, reporter: Reporter) -> list[Token]:
    try:
        return list(parser.lex(text))
    except UnexpectedCharacters as error:
        span = Span(file, error.line, error.column)
        raise reporter.fatal(span, _lexical_message(text, error.pos_in_stream)) from None


def _lexical_message(text: str, position: int) -> str:
    character = text[position]
    if character == '"':
        return 'missing terminating " character'
    if character == "'":
        return "missing terminating ' character"
    if character == "#":
        return "stray '#' in program; a preprocessor directive must start its line"
    if character.isascii() and character.isprintable():
        return f"stray '{character}' in program"
    return f"invalid character U+{ord(character):04X} in program"


def expand_macros(parser: Lark, tokens: list[Token], macros: list[Macro],
                  reporter: Reporter) -> list[Token]:
    """Replace each identifier that names an active macro by the macro's body tokens.

    Expanded tokens take the position of the identifier they replace. As in C, a macro
    is not expanded again inside its own expansion.
    """
    if not macros:
        return tokens
    by_name: dict[str, list[Macro]] = {}
    for macro in macros:
        by_name.setdefault(macro.name, []).append(macro)
    bodies: dict[int, list[Token]] = {}
    output: list[Token] = []
    for token in tokens:
        _expand(parser, token, token, frozenset(), by_name, bodies, output, reporter)
    return output


def _expand(parser, token, site, hidden, by_name, bodies, output, reporter) -> None:
    macro = _active(by_name, token, site) if token.type == "IDENT" else None
    if macro is None or macro.name in hidden:
        output.append(token if token is site else Token.new_borrow_pos(token.type,
                                                                        token.value, site))
        return
    key = id(macro)
    if key not in bodies:
        bodies[key] = _lex_body(parser, macro, reporter)
    for body_token in bodies[key]:
        _expand(parser, body_token, site, hidden | {macro.name}, by_name, bodies, output,
                reporter)


def _active(by_name: dict[str, list[Macro]], token: Token, site: Token) -> Macro | None:
    for macro in by_name.get(token.value, ()):
        last = macro.last_line if macro.last_line is not None else site.line + 1
        if macro.first_line <= site.line < last:
            return macro
    return None


def _lex_body(parser: Lark, macro: Macro, reporter: Reporter) -> list[Token]:
    try:
        return list(parser.lex(macro.body))
    except UnexpectedCharacters as error:
        column = macro.body_column + error.column - 1
        span = Span(macro.span.file, macro.span.line, column)
        raise reporter.fatal(span, _lexical_message(macro.body, error.pos_in_stream)) from None


# --- parsing --------------------------------------------------------------------------


def _parse_tokens(parser: Lark, file: str, tokens: list[Token], reporter: Reporter
                  ) -> ast.TranslationUnit:
    interactive = parser.parse_interactive("")
    position = 0
    try:
        for position, token in enumerate(tokens):
            interactive.feed_token(token)
        position = len(tokens)
        if tokens:
            unit = interactive.feed_eof(tokens[-1])
        else:
            unit = interactive.feed_eof()
    except UnexpectedToken as error:
        # A syntax error right after an unsupported construct is usually its consequence.
        reporter.check()
        expected = _acceptable_terminals(parser, tokens[:position])
        raise reporter.fatal(_error_span(file, error.token, tokens),
                             syntax_error_message(parser, error.token, expected)) from None
    except UnexpectedInput as error:  # any other parse failure Lark reports
        raise reporter.fatal(Span(file, error.line, error.column), "syntax error") from None
    reporter.check()
    if not tokens:
        unit = ast.TranslationUnit(Span(file, 1, 1), [])
    return unit


def _acceptable_terminals(parser: Lark, prefix: list[Token]) -> set[str]:
    """Return the terminals that may follow `prefix`.

    LALR merges states, so at an error the parser may already have reduced on the bad
    token and its expected set is too wide. Replaying the valid prefix and trying each
    terminal from there gives the exact set.
    """
    interactive = parser.parse_interactive("")
    for token in prefix:
        interactive.feed_token(token)
    return interactive.accepts()


def _error_span(file: str, token: Token, tokens: list[Token]) -> Span:
    if token.type != "$END":
        return Span(file, token.line, token.column)
    if not tokens:
        return Span(file, 1, 1)
    last = tokens[-1]
    return Span(file, last.end_line or last.line, (last.end_column or last.column))


# Terminals that end or separate constructs. When one of them is expected, a syntax error
# lists only these and leaves out the operators that could also continue an expression.
_STRUCTURAL = (";", ")", "]", "}", ",", ":")
_TOKEN_NAMES = {
    "IDENT": "identifier",
    "NUMBER": "numeric constant",
    "FLOATING": "floating constant",
    "CHARACTER": "character constant",
    "STRING": "string literal",
    "ASSIGN_OP": "'='",
    "$END": "end of input",
}


def syntax_error_message(parser: Lark, token: Token, names: set[str]) -> str:
    """Describe a syntax error in C terms: what was expected and the token found."""
    if token.type == "UNSUPPORTED_TYPE":
        return unsupported_keyword_message(token.value)
    expected = [_terminal_text(parser, name) for name in sorted(names) if name != "$END"]
    found = _found_text(token)
    description = _describe_expected(expected)
    where = "at end of input" if token.type == "$END" else f"before {found}"
    return f"expected {description} {where}"


def _describe_expected(expected: list[str]) -> str:
    if "'}'" in expected and "'return'" in expected:
        return "a statement or '}'"  # inside a block
    if "'int'" in expected and "'return'" not in expected and "identifier" not in expected:
        return "a declaration"  # at file scope
    structural = [text for text in (f"'{s}'" for s in _STRUCTURAL) if text in expected]
    if "identifier" in expected and structural:
        return _join_or(["identifier", *structural][:3])
    if structural:
        return _join_or(structural[:3])
    if "identifier" in expected and "numeric constant" in expected:
        return "expression"
    candidates = expected or ["end of input"]
    if "identifier" in candidates:
        candidates = ["identifier", *[c for c in candidates if c != "identifier"]]
    return _join_or(candidates[:3])


def _terminal_text(parser: Lark, name: str) -> str:
    if name in _TOKEN_NAMES:
        return _TOKEN_NAMES[name]
    terminal = parser.get_terminal(name)
    if terminal.pattern.type == "str":
        return f"'{terminal.pattern.value}'"
    return name.lower()


def _found_text(token: Token) -> str:
    if token.type in ("NUMBER", "FLOATING", "CHARACTER", "STRING"):
        return _TOKEN_NAMES[token.type]
    return f"'{token.value}'"


def _join_or(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


UNSUPPORTED_KEYWORDS = {
    "long": "'long' is not supported; int and unsigned are 32 bits wide",
    "float": "floating-point type 'float' is not supported",
    "double": "floating-point type 'double' is not supported",
    "struct": "'struct' is not supported",
    "union": "'union' is not supported",
    "enum": "'enum' is not supported; use #define or int constants",
    "typedef": "'typedef' is not supported",
    "extern": "'extern' is not supported; a program is one file",
}


def unsupported_keyword_message(word: str) -> str:
    return UNSUPPORTED_KEYWORDS.get(word, f"'{word}' is not supported")


# --- building the AST -----------------------------------------------------------------


def _nodes(children: list) -> list:
    return [child for child in children if not isinstance(child, Token)]


class _Pointer:
    """One `*` of a declarator with its qualifiers, until the declarator is built."""

    def __init__(self, span: Span, const: bool):
        self.span = span
        self.const = const


class _Parameters:
    def __init__(self, params: list[ast.Parameter], variadic: bool):
        self.params = params
        self.variadic = variadic


class AstBuilder(Transformer):
    """Lark callbacks, one per grammar alias, that build `astnodes` nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.file = "<source>"
        self.reporter = Reporter()

    def start_file(self, file: str, reporter: Reporter) -> None:
        self.file = file
        self.reporter = reporter

    def _span(self, item) -> Span:
        if isinstance(item, Token):
            return Span(self.file, item.line, item.column)
        return item.span

    def _error(self, item, message: str) -> None:
        self.reporter.error(self._span(item), message)

    # --- top level and declarations ---

    def start(self, children):
        span = self._span(children[0]) if children else Span(self.file, 1, 1)
        return ast.TranslationUnit(span, list(children))

    def function_definition(self, children):
        specs, declarator, body = children
        return ast.FunctionDef(specs.span, specs, declarator, body)

    def declaration(self, children):
        specs, *items = _nodes(children)
        return ast.Declaration(specs.span, specs, items)

    def init_declarator(self, children):
        nodes = _nodes(children)
        init = nodes[1] if len(nodes) > 1 else None
        if init is not None and children[1].value != "=":
            self._error(children[1], f"expected '=' before '{children[1].value}'")
        return ast.InitDeclarator(nodes[0].span, nodes[0], init)

    def init_list(self, children):
        return ast.InitList(self._span(children[0]), _nodes(children))

    def decl_specs(self, children):
        words = []
        for token in children:
            if token.type == "UNSUPPORTED_TYPE":
                self._error(token, unsupported_keyword_message(token.value))
                continue
            words.append((token.value, self._span(token)))
        return ast.DeclSpecs(self._span(children[0]), words)

    def pointer(self, children):
        return _Pointer(self._span(children[0]), len(children) > 1)

    def pointer_declarator(self, children):
        pointer, inner = children
        return ast.PointerDeclarator(pointer.span, inner, pointer.const)

    def name_declarator(self, children):
        return ast.NameDeclarator(self._span(children[0]), children[0].value)

    def paren_declarator(self, children):
        return ast.ParenDeclarator(self._span(children[0]), children[1])

    def array_declarator(self, children):
        nodes = _nodes(children)
        size = nodes[1] if len(nodes) > 1 else None
        return ast.ArrayDeclarator(nodes[0].span, nodes[0], size)

    def function_declarator(self, children):
        nodes = _nodes(children)
        parameters = nodes[1] if len(nodes) > 1 else _Parameters([], False)
        return ast.FunctionDeclarator(nodes[0].span, nodes[0], parameters.params,
                                      parameters.variadic)

    def parameter_list(self, children):
        variadic = any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in children)
        return _Parameters(_nodes(children), variadic)

    def parameter(self, children):
        specs, *rest = children
        declarator = rest[0] if rest else ast.NameDeclarator(specs.span, None)
        return ast.Parameter(specs.span, specs, declarator)

    def abstract_pointer(self, children):
        pointer, *rest = children
        inner = rest[0] if rest else ast.NameDeclarator(pointer.span, None)
        return ast.PointerDeclarator(pointer.span, inner, pointer.const)

    def abstract_array(self, children):
        span = self._span(children[0])
        nodes = _nodes(children)
        size = nodes[0] if nodes else None
        return ast.ArrayDeclarator(span, ast.NameDeclarator(span, None), size)

    def abstract_array_more(self, children):
        nodes = _nodes(children)
        size = nodes[1] if len(nodes) > 1 else None
        return ast.ArrayDeclarator(nodes[0].span, nodes[0], size)

    def type_name(self, children):
        specs, *rest = children
        declarator = rest[0] if rest else ast.NameDeclarator(specs.span, None)
        return ast.TypeName(specs.span, specs, declarator)

    # --- statements ---

    def compound_statement(self, children):
        return ast.Compound(self._span(children[0]), _nodes(children))

    def expression_statement(self, children):
        nodes = _nodes(children)
        return ast.ExprStmt(self._span(children[0]), nodes[0] if nodes else None)

    def if_statement(self, children):
        condition, then = _nodes(children)
        return ast.If(self._span(children[0]), condition, then, None)

    def if_else_statement(self, children):
        condition, then, otherwise = _nodes(children)
        return ast.If(self._span(children[0]), condition, then, otherwise)

    def while_statement(self, children):
        condition, body = _nodes(children)
        return ast.While(self._span(children[0]), condition, body)

    def do_statement(self, children):
        body, condition = _nodes(children)
        return ast.DoWhile(self._span(children[0]), body, condition)

    def for_statement(self, children):
        init, condition, step, body = children[2], children[3], children[5], children[7]
        return ast.For(self._span(children[0]), init, condition, step, body)

    def for_init(self, children):
        nodes = _nodes(children)
        return nodes[0] if nodes else None

    def for_condition(self, children):
        return children[0] if children else None

    for_step = for_condition

    def break_statement(self, children):
        return ast.Break(self._span(children[0]))

    def continue_statement(self, children):
        return ast.Continue(self._span(children[0]))

    def return_statement(self, children):
        nodes = _nodes(children)
        return ast.Return(self._span(children[0]), nodes[0] if nodes else None)

    def switch_statement(self, children):
        condition, body = _nodes(children)
        return ast.Switch(self._span(children[0]), condition, body)

    def case_statement(self, children):
        value, body = _nodes(children)
        return ast.Case(self._span(children[0]), value, body)

    def default_statement(self, children):
        return ast.Default(self._span(children[0]), _nodes(children)[0])

    def goto_statement(self, children):
        self._error(children[0], "'goto' is not supported")
        return ast.ExprStmt(self._span(children[0]), None)

    def labeled_statement(self, children):
        self._error(children[0], "labels are not supported (tlc has no goto)")
        return children[2]

    # --- expressions ---

    def comma(self, children):
        left, right = _nodes(children)
        return ast.Comma(self._span(children[1]), left, right)

    def assign(self, children):
        target, operator, source = children
        return ast.Assign(self._span(operator), operator.value, target, source)

    def conditional(self, children):
        condition, then, otherwise = _nodes(children)
        return ast.Conditional(self._span(children[1]), condition, then, otherwise)

    def binary(self, children):
        left, operator, right = children
        return ast.Binary(self._span(operator), operator.value, left, right)

    def cast(self, children):
        type_name, operand = _nodes(children)
        return ast.Cast(self._span(children[0]), type_name, operand)

    def prefix_incdec(self, children):
        operator, operand = children
        return ast.IncDec(self._span(operator), operator.value, True, operand)

    def unary(self, children):
        operator, operand = children
        return ast.Unary(self._span(operator), operator.value, operand)

    def sizeof_expr(self, children):
        return ast.SizeofExpr(self._span(children[0]), children[1])

    def sizeof_type(self, children):
        return ast.SizeofType(self._span(children[0]), _nodes(children)[0])

    def index(self, children):
        base, index = _nodes(children)
        return ast.Index(self._span(children[1]), base, index)

    def call(self, children):
        callee, *args = _nodes(children)
        return ast.Call(callee.span, callee, args)

    def postfix_incdec(self, children):
        operand, operator = children
        return ast.IncDec(self._span(operator), operator.value, False, operand)

    def member(self, children):
        self._error(children[1], "struct and union member access is not supported")
        return children[0]

    def name(self, children):
        return ast.Name(self._span(children[0]), children[0].value)

    def number(self, children):
        token = children[0]
        try:
            value, is_unsigned = parse_integer(token.value)
        except LiteralError as error:
            self._error(token, str(error))
            value, is_unsigned = 0, False
        return ast.IntLiteral(self._span(token), value, is_unsigned, token.value)

    def floating(self, children):
        self._error(children[0], "floating-point constants are not supported")
        return ast.IntLiteral(self._span(children[0]), 0, False, children[0].value)

    def character(self, children):
        token = children[0]
        try:
            value = decode_character(token.value)
        except LiteralError as error:
            self._error(token, str(error))
            value = 0
        return ast.CharLiteral(self._span(token), value)

    def string(self, children):
        data = bytearray()
        for token in children:
            try:
                data += decode_string(token.value)
            except LiteralError as error:
                self._error(token, str(error))
        return ast.StringLiteral(self._span(children[0]), bytes(data))

    def paren(self, children):
        return children[1]
