"""Local graceful degradation by tiers of criticality (see docs/architecture.md, "Degradation").

:func:`run` is the daemon task; :func:`setup` the DB migration. The pure parts are
:mod:`agent.degrade.planner` (what fits) and :mod:`agent.degrade.tracker` (hysteresis, state).
"""

from agent.degrade.controller import FIELD_MANAGER, Controller, run
from agent.degrade.records import setup

__all__ = ["FIELD_MANAGER", "Controller", "run", "setup"]
