"""Benchmarks that print numbers: the training step against peers (``train``), a real job's epoch
against its matmul bound (``epoch``), and KV-cache generation against HF ``generate``
(``generate``). Absolute numbers move with machine load; compare ratios measured in one run.

Modules: :mod:`.common` (options, timing), :mod:`.train`, :mod:`.epoch`, :mod:`.generate`,
:mod:`.peers` (the models ours is timed against), :mod:`.results` (typed results, JSON),
:mod:`.report` (Markdown).
"""
