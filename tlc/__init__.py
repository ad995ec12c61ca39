"""tlc: compile a C subset into transformer weights and run programs inside the model."""
