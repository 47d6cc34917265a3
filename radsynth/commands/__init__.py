"""One module per ``radsynth`` verb.

Each module defines ``HELP`` (one line), ``EPILOG`` (examples shown by ``--help``),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status).
"""
