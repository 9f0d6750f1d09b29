"""Thin command-line entry points over the helper package."""
