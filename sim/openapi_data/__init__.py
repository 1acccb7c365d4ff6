"""Generated OpenAPI data served by sim.openapi (see sim.openapi_gen)."""
