"""Datasets over the prepared layout, training/test transforms and dataset preparation."""
