"""Shared test harnesses (one site harness for tests, demo and benchmarks)."""
