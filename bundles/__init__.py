"""Signed offline bundles: format, trust root, build, sign, verify and safe staging."""
