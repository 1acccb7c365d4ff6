"""The install engine: persisted plan + journal, apply, gates, inventory, prune, rollback, drift.

:mod:`agent.installer` drives it; :mod:`agent.intake` feeds it verified bundles.
"""
