"""Benchmarks of marble (run with `make bench`); results land in bench/results/."""
