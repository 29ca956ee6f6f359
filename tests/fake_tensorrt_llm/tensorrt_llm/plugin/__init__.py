from .plugin import PluginConfig

__all__ = ["PluginConfig"]
