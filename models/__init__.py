"""E3 models."""
