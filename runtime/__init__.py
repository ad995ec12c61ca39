"""Runtimes that execute 55-opcode stack code: the reference interpreter and the model runners."""
