"""What the benchmark scripts share, one concern per module.

- :mod:`~benchmarks.harness.base`: paths, sizes, the common flags, alternation, temp folders.
- :mod:`~benchmarks.harness.report`: the machine, statistics, Markdown tables, JSON results.
- :mod:`~benchmarks.harness.sim`: the simulator as a separate process, and raw API calls.
- :mod:`~benchmarks.harness.runs`: job files and ``mics-export run`` as a measured subprocess.
- :mod:`~benchmarks.harness.events`: the run's JSON log events (``--log-format json``).
- :mod:`~benchmarks.harness.sampler`: RSS and CPU over a process tree, sampled.
- :mod:`~benchmarks.harness.ceiling`: the one-core validation ceiling and ``curl``.
- :mod:`~benchmarks.harness.pyspy`: recording and summarising py-spy profiles.

Every benchmark compares against a baseline measured in the same invocation, with the
variants run in alternation (the order rotates each repeat), and reports medians with
min–max ranges. The machine is shared and noisy: read ratios, not absolute numbers.
"""
