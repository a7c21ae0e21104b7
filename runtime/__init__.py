"""E3 runtime."""
