"""`python -m tlc` runs the command-line interface."""

from tlc.cli import main

raise SystemExit(main())
