"""RadSynth: synthetic radiology data generator.

The distribution ``radsynth`` ships four libraries (``conditioning``, ``generator``, ``privacy``,
``exporters``) and this small package, which holds the version and the command line: the only place
that wires the libraries together (DESIGN.md §2).
"""

__version__ = "0.1.0"
