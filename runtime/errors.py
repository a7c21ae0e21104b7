"""Exceptions raised by e3.runtime. Each class says when it is raised and
carries the HTTP status the endpoint answers it with."""


class RuntimeError_(Exception):
    """Base class of every error raised by e3.runtime (HTTP 500 unless overridden)."""

    status = 500


class ConfigError(RuntimeError_, ValueError):
    """Raised when a configuration value is invalid; the message quotes it."""

    status = 400


class OverloadedError(RuntimeError_):
    """Raised when admission refuses a request because its bounded queue is full."""

    status = 503
    retry_after_s = 1


class NotReadyError(RuntimeError_):
    """Raised when a request arrives before the runtime has started or after it stopped."""

    status = 503
    retry_after_s = 1


class ConflictError(RuntimeError_):
    """Raised when a valid request cannot apply to the running node as configured
    (e.g. an exit policy with other state fields, which needs a restart)."""

    status = 409


class DeadlineExceededError(RuntimeError_):
    """Raised when a request's deadline passed before it could be answered."""

    status = 504


class WorkerFailedError(RuntimeError_):
    """Raised when a worker died (or failed a batch) and retries were exhausted."""

    status = 500


class ForecastProcessError(RuntimeError_):
    """Raised by the planner's forecast process client when the child died, timed out, or
    answered with an error; the planner logs it and tries again next interval."""


class WireError(RuntimeError_):
    """Raised when a peer sends a malformed or oversized frame."""
