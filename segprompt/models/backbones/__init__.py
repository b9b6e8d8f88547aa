"""Backbones that expose their stages (the slots where tuning methods insert modules)."""
