"""Benchmarks of propserve against other model servers."""
