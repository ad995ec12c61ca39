"""Front end and back end of the tlc compiler: .tl source to 55-opcode stack code."""
