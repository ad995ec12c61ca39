"""Command-line interface of tlc."""


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("tlc: the command-line interface is not built yet")
