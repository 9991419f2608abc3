"""Backends shipped with the suite."""
