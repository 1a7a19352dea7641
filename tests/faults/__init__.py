"""Fault-injection helpers for the reliability tests: a TCP proxy and a mixed workload."""
