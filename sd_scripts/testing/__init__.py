"""Helpers for tests, benchmarks and the quick-start example (tiny random models built in code).

Not part of the engine's layers: nothing in the engine imports it. It may import ``models``.
"""
