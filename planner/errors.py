"""Exceptions raised by e3.planner. Each class says when it is raised."""


class PlannerError(Exception):
    """Base class of every error raised by e3.planner."""


class ProblemError(PlannerError, ValueError):
    """Raised when a planning problem (JSON or objects) is malformed; names the field and value."""


class ProfileError(PlannerError, ValueError):
    """Raised when a latency profile is malformed or does not fit the model."""
