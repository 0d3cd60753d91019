"""Benchmarks that print figures: tuned vs default (speedup), host overhead, the torch backend's stages."""
