"""Converted attention layers, one file per method (see `linearize.methods` for the registry)."""
