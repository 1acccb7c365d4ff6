"""The edgefleet site agent: installs and supervises the platform from verified bundles."""
