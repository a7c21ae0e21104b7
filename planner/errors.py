"""Exceptions raised by e3.planner. Each class says when it is raised."""


class PlannerError(Exception):
    """Base class of every error raised by e3.planner."""


class ProblemError(PlannerError, ValueError):
    """Raised when a planning problem (JSON or objects) is malformed; names the field and quotes the value."""


class ProfileError(PlannerError, ValueError):
    """Raised when a latency profile is malformed or does not fit the model."""


class ConfigError(PlannerError, ValueError):
    """Raised by PlannerConfig.validate for a bad field; names the field and quotes the value."""


class SimulationError(PlannerError, ValueError):
    """Raised when a simulation is asked for something it cannot replay (a plan that does not fit the problem,
    an exit trace shorter than the arrivals)."""
