"""The body of each ``a2a-bench`` command: options as :mod:`a2a_bench.cli` parsed them in, work done,
lines printed. Testable without Typer; the layer above engine, bench and reports."""
