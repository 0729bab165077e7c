"""Support for the tests and benchmarks: the dense reference maths, hand-driven engines, tiny recipes.

Nothing in the runtime package imports this subpackage (docs/architecture.md); it ships so that the tests, the
benchmarks and users' own checks can share one copy of each helper.
"""
