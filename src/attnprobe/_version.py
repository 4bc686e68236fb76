"""The version of attnprobe (also in pyproject.toml)."""

__version__ = "0.3.0.dev0"
