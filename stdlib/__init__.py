"""The C library of tlc programs, written in .tl."""
