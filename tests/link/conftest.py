"""Fixtures of the link tests (helpers live in link_harness.py)."""

from link_harness import broker, make_agent, pki

__all__ = ["broker", "make_agent", "pki"]
