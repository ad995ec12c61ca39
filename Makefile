# `make run` runs an example program; `make test` runs the test suite. Both create and
# update .venv first through scripts/bootstrap.sh.

VENV := .venv
EXAMPLE ?= $(firstword $(wildcard examples/hungarian.tl) examples/countdown.tasm)

.PHONY: bootstrap run test

bootstrap:
	scripts/bootstrap.sh

run: bootstrap
	$(VENV)/bin/tlc $(EXAMPLE)

test: bootstrap
	$(VENV)/bin/pytest -q
