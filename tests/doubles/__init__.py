"""Deterministic test doubles for the stage backends. Never used by the product itself."""
