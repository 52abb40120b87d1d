"""Stub of ``kaolin`` for random-weight GPU runs only (see ../../README.md)."""
