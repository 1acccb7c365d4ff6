"""Process exit codes of ``edgefleet-agent``: one per failure class, stable for scripts."""

OK = 0
USAGE = 2
CONFIG = 3
BUNDLE_REJECTED = 4
NOT_FOUND = 5
UNAVAILABLE = 6
SNAPSHOT_FAILED = 7
INSTALL_FAILED = 8
INTERNAL = 70
