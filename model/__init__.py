"""Analytic construction of the transformer weights that execute the 55-opcode machine."""
