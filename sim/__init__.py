"""A simulated edge site that speaks the Kubernetes REST API (nodes, scheduling, failures)."""
