"""What is made of results: tuning tables (tune), tables for people, plots, comparisons, exports, the
machine's description."""
