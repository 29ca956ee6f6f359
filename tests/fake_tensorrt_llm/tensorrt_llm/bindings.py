import enum


class KVCacheType(enum.Enum):
    """Stands in for the C++ enum that tensorrt_llm/builder.py imports from .bindings."""

    CONTINUOUS = 0
    PAGED = 1
    DISABLED = 2
