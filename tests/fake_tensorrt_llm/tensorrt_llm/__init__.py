"""Fake tensorrt_llm for tests (see ../README.md)."""

__version__ = "1.2.1"
