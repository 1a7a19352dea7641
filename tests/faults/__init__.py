"""Fault injection for the tests: kill loops and their sizes (chaos), Databases that replay or
intercept calls (databases), a TCP proxy (proxy) and a mixed workload with its checks (workload)."""
