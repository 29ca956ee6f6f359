"""Stand-ins for tests and benchmarks, never used in production: the trivial engine (trivial_engine.py)."""
