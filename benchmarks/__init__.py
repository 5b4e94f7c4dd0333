"""The benchmarks: scripts run as ``python benchmarks/NAME.py`` (see README.md), and their
shared pieces in :mod:`benchmarks.harness`.

A package so that the scripts import their helpers by one name (``benchmarks.harness.…``),
the same one ``mypy --strict --explicit-package-bases benchmarks`` gives them.
"""
