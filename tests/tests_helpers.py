"""CLI flags equivalent to conftest.TINY."""

from conftest import TINY

TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
