"""Benchmarks: every figure is measured against raw asyncpg in the same run and reported as a ratio."""
