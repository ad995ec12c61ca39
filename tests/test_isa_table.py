"""compiler/isa.py against the opcode table of docs/isa.md: numbers, mnemonics, immediate
kinds and stack effects."""

from __future__ import annotations

import re

import pytest
from conftest import REPOSITORY

from tlc.compiler.isa import BY_MNEMONIC, OPCODES, Immediate, Opcode

_NUMBERS = re.compile(r"\d+(, \d+)*\Z")
_EFFECT = re.compile(r"`\( (?P<before>[^`]*?)-- ?(?P<after>[^`]*?) ?\)`")


def documented_opcodes() -> dict[int, tuple[str, str, int, int]]:
    """Read the opcode table: number -> (mnemonic, immediate column, pops, pushes)."""
    rows = {}
    for line in (REPOSITORY / "docs" / "isa.md").read_text().splitlines():
        # Cells are separated by pipes that are not escaped as `\|`.
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 4 or not _NUMBERS.match(cells[0]):
            continue
        numbers = [int(n) for n in cells[0].split(",")]
        names = [name.split()[0] for name in re.findall(r"`([^`]+)`", cells[1])]
        effect = _EFFECT.search(cells[3])
        pops = len(effect["before"].split())
        pushes = _count_results(effect["after"], effect["before"].split())
        for number, name in zip(numbers, names, strict=True):
            rows[number] = (name, cells[2], pops, pushes)
    return rows


def _count_results(after: str, before: list[str]) -> int:
    """Count the values after `--`: a list of operand names (`b c a`) or one expression."""
    tokens = after.split()
    if not tokens:
        return 0
    if all(token in before for token in tokens):
        return len(tokens)
    return 1


DOCUMENTED = documented_opcodes()


def test_doc_lists_55_opcodes():
    assert sorted(DOCUMENTED) == list(range(55))


@pytest.mark.parametrize("number", range(55))
def test_opcode_matches_doc(number):
    mnemonic, immediate, pops, pushes = DOCUMENTED[number]
    info = OPCODES[Opcode(number)]
    assert info.mnemonic == mnemonic
    assert info.immediate.value == (immediate or Immediate.NONE.value)
    assert info.pops == pops
    assert info.pushes == pushes


def test_mnemonic_lookup_covers_every_opcode():
    assert sorted(BY_MNEMONIC.values()) == sorted(Opcode)
