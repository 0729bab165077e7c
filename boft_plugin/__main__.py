"""``python -m boft_plugin ...``: the ``boft-plugin`` command line (see :mod:`boft_plugin.cli`)."""

from boft_plugin.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
