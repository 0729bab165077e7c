"""Process-level support every layer may use: atomic writes, launchers, ranks and per-rank logging, process memory
and exit, torch-extension build locks, the run lock on an output directory, and the private upstream names relied on.

Imports only the standard library, torch, psutil (and, lazily, the upstream libraries named in :mod:`.upstream`).
"""
