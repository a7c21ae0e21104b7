"""E3 planner."""
