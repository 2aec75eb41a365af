"""Measurement and study tools, outside the engine's core: the benchmark, the memory-bank study,
evaluation metrics and the memory-trace picture."""
