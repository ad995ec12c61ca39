"""A Hypothesis generator of random, well-formed, terminating .tl programs.

The programs are valid C with one meaning under gcc -fwrapv, so gcc is the oracle. The
generator avoids every undefined or unspecified behaviour that could make gcc and tlc
disagree:

- divisors are `(e & 255) + 1` or `-((e & 255) + 2)` (never 0 or -1) or `e | 1u`;
- shift counts are masked with `& 31`;
- array indices are masked with `& (length - 1)` (lengths are powers of two);
- side effects happen only in statements (`v = e;`, `v += e;`, `v++;`, `w = v++;` with
  w and v distinct), so no expression reads a variable that it also modifies;
- helper functions only read globals and never print, so the evaluation order of the
  operands and arguments that call them does not matter;
- loops count a dedicated variable to a small bound, calls go only to functions defined
  earlier (and one recursive function with a bounded depth), so every program stops;
- `sizeof` appears only cast to int, since size_t is 64 bits wide under gcc.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

INT_TYPES = ("int", "unsigned", "char", "unsigned char", "short", "unsigned short", "_Bool")
ARRAY_LENGTH = 8  # a power of two, so `& 7` keeps indices in range
INTERESTING_CONSTANTS = (
    "0", "1", "2", "3", "7", "-1", "-7", "100", "255", "256", "-128", "32767", "-32768",
    "65535", "2147483647", "(-2147483647 - 1)", "4294967295u", "0x80000000u", "0x7fu",
    "'a'", "'\\n'", "'\\xff'", "1000000", "-1000000", "12345u",
)  # fmt: skip
BINARY_OPERATORS = ("+", "-", "*", "&", "|", "^", "<", ">", "<=", ">=", "==", "!=",
                    "&&", "||")
COMPOUND_OPERATORS = ("+=", "-=", "*=", "&=", "|=", "^=")


@dataclass
class Function:
    name: str
    result: str
    params: list[tuple[str, str]]  # (type, name)
    reads_pointer: bool = False


@dataclass
class Scope:
    """What an expression may read and a statement may write at one point."""

    readable: list[tuple[str, str]]  # (type, name) of scalars
    writable: list[tuple[str, str]]
    arrays: list[tuple[str, str]]  # (element type, name), each of ARRAY_LENGTH elements
    writable_arrays: list[tuple[str, str]]
    pointers: list[str]  # int pointers with ARRAY_LENGTH readable ints after them
    functions: list[Function]
    in_loop: bool = False
    loop_counters: list[str] = field(default_factory=list)
    # Functions that loop bodies may call: none inside helper functions, so that the
    # work of nested calls stays bounded.
    loop_functions: list[Function] | None = None

    def arrays_of_int(self) -> list[tuple[str, str]]:
        return [(t, n) for t, n in self.arrays if t == "int"]


class ProgramGenerator:
    """Draws one program; `draw` is Hypothesis's draw function."""

    def __init__(self, draw):
        self.draw = draw
        self.lines: list[str] = []
        self.counter = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def choice(self, items):
        return self.draw(st.sampled_from(list(items)))

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    # --- expressions ---

    def constant(self) -> str:
        if self.draw(st.booleans()):
            return self.choice(INTERESTING_CONSTANTS)
        return str(self.integer(-5000, 5000))

    def expression(self, scope: Scope, depth: int) -> str:
        if depth <= 0 or self.integer(0, 9) < 3:
            return self.leaf(scope, depth)
        kind = self.integer(0, 9)
        if kind <= 3:
            op = self.choice(BINARY_OPERATORS)
            return f"({self.expression(scope, depth - 1)} {op} {self.expression(scope, depth - 1)})"
        if kind == 4:
            return self.division(scope, depth)
        if kind == 5:
            op = self.choice(("<<", ">>"))
            return (f"({self.expression(scope, depth - 1)} {op} "
                    f"({self.expression(scope, depth - 1)} & 31))")
        if kind == 6:
            op = self.choice(("-", "~", "!", "+"))
            return f"({op} {self.expression(scope, depth - 1)})"
        if kind == 7:
            return f"(({self.choice(INT_TYPES)}) {self.expression(scope, depth - 1)})"
        if kind == 8:
            return (f"({self.expression(scope, depth - 1)} ? {self.expression(scope, depth - 1)}"
                    f" : {self.expression(scope, depth - 1)})")
        return self.call(scope, depth)

    def division(self, scope: Scope, depth: int) -> str:
        op = self.choice(("/", "%"))
        inner = self.expression(scope, depth - 1)
        divisor = self.choice((
            f"(({inner} & 255) + 1)",
            f"(-(({inner} & 255) + 2))",
            f"((unsigned) {inner} | 1u)",
        ))
        return f"({self.expression(scope, depth - 1)} {op} {divisor})"

    def leaf(self, scope: Scope, depth: int) -> str:
        kind = self.integer(0, 9)
        if kind <= 2 or not (scope.readable or scope.arrays):
            return self.constant()
        if kind <= 5 and scope.readable:
            return self.choice(scope.readable)[1]
        if kind <= 7 and scope.arrays:
            _, name = self.choice(scope.arrays)
            return f"{name}[{self.index(scope, depth)}]"
        if kind == 8 and scope.pointers:
            pointer = self.choice(scope.pointers)
            if self.draw(st.booleans()):
                return f"*({pointer} + {self.index(scope, depth)})"
            return f"{pointer}[{self.index(scope, depth)}]"
        if self.draw(st.booleans()):
            return f"((int) sizeof({self.choice(INT_TYPES)}))"
        return self.constant()

    def index(self, scope: Scope, depth: int) -> str:
        if depth <= 0:
            return str(self.integer(0, ARRAY_LENGTH - 1))
        return f"(({self.expression(scope, depth - 1)}) & {ARRAY_LENGTH - 1})"

    def call(self, scope: Scope, depth: int) -> str:
        if not scope.functions:
            return self.leaf(scope, depth)
        function = self.choice(scope.functions)
        args = []
        for ctype, _ in function.params:
            if ctype == "int *":
                args.append(self.choice([name for _, name in scope.arrays_of_int()]))
            else:
                args.append(self.expression(scope, min(depth - 1, 1)))
        return f"{function.name}({', '.join(args)})"

    # --- statements ---

    def statements(self, scope: Scope, count: int, depth: int, indent: str) -> None:
        for _ in range(count):
            self.statement(scope, depth, indent)

    def statement(self, scope: Scope, depth: int, indent: str) -> None:
        kind = self.integer(0, 11)
        if depth <= 0 or kind <= 4:
            self.simple_statement(scope, indent)
        elif kind <= 6:
            self.if_statement(scope, depth, indent)
        elif kind <= 8:
            self.for_statement(scope, depth, indent)
        elif kind == 9:
            self.switch_statement(scope, depth, indent)
        elif kind == 10:
            self.while_statement(scope, depth, indent)
        elif scope.in_loop:
            keyword = self.choice(("break", "continue"))
            self.lines.append(f"{indent}if ({self.expression(scope, 2)}) {keyword};")
        else:
            self.simple_statement(scope, indent)

    def simple_statement(self, scope: Scope, indent: str) -> None:
        kind = self.integer(0, 7)
        expression = self.expression(scope, 3)
        if kind <= 4 and scope.writable:
            _, name = self.choice(scope.writable)
            if kind <= 1:
                self.lines.append(f"{indent}{name} = {expression};")
            elif kind == 2:
                self.lines.append(f"{indent}{name} {self.choice(COMPOUND_OPERATORS)} {expression};")
            elif kind == 3:
                op = self.choice(("/=", "%="))
                self.lines.append(f"{indent}{name} {op} (({expression} & 255) + 1);")
            else:
                self.increment(scope, name, indent)
        elif kind <= 6 and scope.writable_arrays:
            _, name = self.choice(scope.writable_arrays)
            op = self.choice(("=", *COMPOUND_OPERATORS))
            self.lines.append(f"{indent}{name}[{self.index(scope, 2)}] {op} {expression};")
            if ("int", "table") in scope.writable_arrays and self.draw(st.booleans()):
                # cursor points at table[0], so this writes table through a pointer.
                self.lines.append(f"{indent}*(cursor + {self.index(scope, 1)}) {op} "
                                  f"{self.expression(scope, 2)};")
        elif scope.writable:
            _, name = self.choice(scope.writable)
            self.lines.append(f"{indent}{name} <<= ({expression}) & 31;")

    def increment(self, scope: Scope, name: str, indent: str) -> None:
        op = self.choice(("++", "--"))
        others = [n for _, n in scope.writable if n != name]
        if others and self.draw(st.booleans()):
            target = self.choice(others)
            form = self.choice((f"{name}{op}", f"{op}{name}"))
            self.lines.append(f"{indent}{target} = {form};")
        else:
            self.lines.append(f"{indent}{name}{op};")

    def block(self, scope: Scope, depth: int, indent: str) -> None:
        self.statements(scope, self.integer(1, 3), depth - 1, indent + "    ")

    def if_statement(self, scope: Scope, depth: int, indent: str) -> None:
        self.lines.append(f"{indent}if ({self.expression(scope, 3)}) {{")
        self.block(scope, depth, indent)
        if self.draw(st.booleans()):
            self.lines.append(f"{indent}}} else {{")
            self.block(scope, depth, indent)
        self.lines.append(f"{indent}}}")

    def _loop_scope(self, scope: Scope, counter: str) -> Scope:
        readable = scope.readable + [("int", counter)]
        functions = scope.functions if scope.loop_functions is None else scope.loop_functions
        return Scope(readable, scope.writable, scope.arrays, scope.writable_arrays,
                     scope.pointers, functions, True, scope.loop_counters + [counter],
                     scope.loop_functions)

    def for_statement(self, scope: Scope, depth: int, indent: str) -> None:
        counter = self.fresh("i")
        bound = self.integer(1, 4)
        self.lines.append(f"{indent}{{ int {counter};")
        self.lines.append(f"{indent}for ({counter} = 0; {counter} < {bound}; {counter}++) {{")
        self.block(self._loop_scope(scope, counter), depth, indent)
        self.lines.append(f"{indent}}} }}")

    def while_statement(self, scope: Scope, depth: int, indent: str) -> None:
        counter = self.fresh("w")
        bound = self.integer(1, 4)
        self.lines.append(f"{indent}{{ int {counter} = 0;")
        if self.draw(st.booleans()):
            self.lines.append(f"{indent}while ({counter} < {bound}) {{")
            self.lines.append(f"{indent}    {counter}++;")
            self.block(self._loop_scope(scope, counter), depth, indent)
            self.lines.append(f"{indent}}} }}")
        else:
            self.lines.append(f"{indent}do {{")
            self.lines.append(f"{indent}    {counter}++;")
            self.block(self._loop_scope(scope, counter), depth, indent)
            self.lines.append(f"{indent}}} while ({counter} < {bound}); }}")

    def switch_statement(self, scope: Scope, depth: int, indent: str) -> None:
        self.lines.append(f"{indent}switch (({self.expression(scope, 2)}) & 3) {{")
        inner = Scope(scope.readable, scope.writable, scope.arrays, scope.writable_arrays,
                      scope.pointers, scope.functions, False, scope.loop_counters,
                      scope.loop_functions)
        labels = self.draw(st.lists(st.sampled_from(["0", "1", "2", "3", "default"]),
                                    min_size=1, max_size=4, unique=True))
        for label in labels:
            self.lines.append(f"{indent}{'default' if label == 'default' else 'case ' + label}:")
            count = self.integer(0, 2)
            self.statements(inner, count, depth - 1, indent + "    ")
            if count == 0:
                self.lines.append(f"{indent}    ;")  # C requires a statement after a label
            if self.draw(st.booleans()):
                self.lines.append(f"{indent}    break;")
        self.lines.append(f"{indent}}}")


@st.composite
def programs(draw) -> str:
    """A complete .tl program that prints its state and returns a checksum."""
    generator = ProgramGenerator(draw)
    lines = generator.lines
    lines.append("#include <stdio.h>")
    lines.append("")

    arrays = [("int", "table")]
    lines.append("int table[8] = {" + ", ".join(generator.constant() for _ in range(8)) + "};")
    globals_ = []
    for _ in range(generator.integer(1, 4)):
        ctype = generator.choice(INT_TYPES)
        name = generator.fresh("g")
        lines.append(f"{ctype} {name} = {generator.constant()};")
        globals_.append((ctype, name))
    for _ in range(generator.integer(0, 2)):
        ctype = generator.choice(INT_TYPES[:-1])
        name = generator.fresh("a")
        count = generator.integer(0, ARRAY_LENGTH)
        values = ", ".join(generator.constant() for _ in range(count))
        lines.append(f"{ctype} {name}[{ARRAY_LENGTH}] = {{{values}}};")
        arrays.append((ctype, name))
    lines.append("int *cursor = &table[0];")
    pointers = ["cursor"]

    functions: list[Function] = []
    for _ in range(generator.integer(0, 3)):
        functions.append(_function(generator, globals_, arrays, pointers, list(functions)))
    if generator.draw(st.booleans()):
        functions.append(_recursive_function(generator, globals_, arrays, pointers,
                                             list(functions)))

    _main(generator, globals_, arrays, pointers, functions)
    return "\n".join(lines) + "\n"


def _function(generator: ProgramGenerator, globals_, arrays, pointers, functions) -> Function:
    lines = generator.lines
    name = generator.fresh("f")
    result = generator.choice(INT_TYPES)
    params = [(generator.choice(INT_TYPES), generator.fresh("p"))
              for _ in range(generator.integer(0, 3))]
    if generator.draw(st.booleans()):
        params.append(("int *", generator.fresh("q")))
    signature = ", ".join(f"{t} {n}" for t, n in params) or "void"
    lines.append("")
    lines.append(f"{result} {name}({signature}) {{")
    local_type = generator.choice(INT_TYPES)
    local = generator.fresh("v")
    local_array = generator.fresh("la")
    scalars = [(t, n) for t, n in params if t != "int *"]
    pointer_params = [n for t, n in params if t == "int *"]
    read_scope = Scope(globals_ + scalars, [], arrays, [], pointers + pointer_params,
                       functions, loop_functions=[])
    lines.append(f"    {local_type} {local} = {generator.expression(read_scope, 2)};")
    initial = ", ".join(generator.expression(read_scope, 1) for _ in range(generator.integer(1, 3)))
    lines.append(f"    int {local_array}[{ARRAY_LENGTH}] = {{{initial}}};")
    writable = scalars + [(local_type, local)]
    scope = Scope(globals_ + writable, writable, arrays + [("int", local_array)],
                  [("int", local_array)], pointers + pointer_params, functions,
                  loop_functions=[])
    generator.statements(scope, generator.integer(1, 4), 2, "    ")
    lines.append(f"    return {generator.expression(scope, 3)};")
    lines.append("}")
    return Function(name, result, params)


def _recursive_function(generator: ProgramGenerator, globals_, arrays, pointers, functions
                        ) -> Function:
    lines = generator.lines
    name = generator.fresh("r")
    scope = Scope(globals_ + [("int", "x"), ("int", "n")], [], arrays, [], pointers,
                  functions, loop_functions=[])
    lines.append("")
    lines.append(f"int {name}(int n, int x) {{")
    lines.append(f"    if (n <= 0) return {generator.expression(scope, 2)};")
    op = generator.choice(("+", "-", "^", "*"))
    lines.append(f"    return {name}(n - 1, {generator.expression(scope, 2)}) {op} "
                 f"{generator.expression(scope, 2)};")
    lines.append("}")
    # Callers pass n = (e & 7), so the depth stays below 8.
    return Function(name, "int", [("int", "n"), ("int", "x")])


def _main(generator: ProgramGenerator, globals_, arrays, pointers, functions) -> None:
    lines = generator.lines
    lines.append("")
    lines.append("int main(void) {")
    locals_ = []
    for _ in range(generator.integer(1, 3)):
        ctype = generator.choice(INT_TYPES)
        name = generator.fresh("m")
        locals_.append((ctype, name))
    callable_ = [f for f in functions if not f.name.startswith("r")]
    recursive = [f for f in functions if f.name.startswith("r")]
    init_scope = Scope(globals_, [], arrays, [], pointers, callable_)
    for ctype, name in locals_:
        lines.append(f"    {ctype} {name} = {generator.expression(init_scope, 2)};")
    local_array = generator.fresh("ml")
    initial = ", ".join(generator.expression(init_scope, 1) for _ in range(generator.integer(1, 4)))
    lines.append(f"    short {local_array}[{ARRAY_LENGTH}] = {{{initial}}};")
    arrays = arrays + [("short", local_array)]
    writable = globals_ + locals_
    scope = Scope(writable, writable, arrays, list(arrays), pointers, callable_)
    for function in recursive:
        target = generator.choice(writable)[1]
        lines.append(f"    {target} = {function.name}({generator.expression(scope, 1)} & 7, "
                     f"{generator.expression(scope, 2)});")
    generator.statements(scope, generator.integer(2, 6), 3, "    ")
    for ctype, name in writable:
        form = "%u" if ctype.startswith("unsigned") else "%d"
        lines.append(f'    printf("{name} = {form}\\n", {name});')
    for _, name in arrays:
        lines.append(f"    {{ int k; for (k = 0; k < {ARRAY_LENGTH}; k++) "
                     f'printf("%d ", (int) {name}[k]); printf("\\n"); }}')
    checksum = " ^ ".join(f"(int) {name}" for _, name in writable) or "0"
    lines.append(f"    return ({checksum}) & 255;")
    lines.append("}")
