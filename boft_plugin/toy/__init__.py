"""Tiny config-built models, a character tokenizer and synthetic chat tasks, for tests, examples and benchmarks."""
