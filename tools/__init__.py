"""The top layer: the ``logitstore`` command line (``tools.cli``), the demo, benchmarks and maintenance scripts.

Only this layer imports the store (``logitstore``), the builders and the trainers together, and
only it prints. Benchmarks are scripts (``python tools/bench_*.py``) that print their figures.
"""
