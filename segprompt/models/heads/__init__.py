"""Decode and auxiliary heads."""
