"""The paper's experiments and the demo: not part of the library's core."""
