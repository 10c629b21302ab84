"""Benchmarks (not tests): `python -m bench` (the whole table), `python -m bench.vit` (the image tower)."""
