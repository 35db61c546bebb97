"""Shared pytest configuration: make ``tests`` importable as a package and seed hypothesis."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")
