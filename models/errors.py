"""Exceptions raised by e3.models. Each class says when it is raised.

They subclass the matching built-in (ValueError, IndexError, ...) so that a
caller that knows nothing of E3 still catches them sensibly; the runtime maps
them to HTTP 4xx answers.
"""


class ModelError(Exception):
    """Base class of every error raised by e3.models."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """Raised when a model path or name does not exist or holds no model."""


class CheckpointError(ModelError, ValueError):
    """Raised when a checkpoint exists but its files are missing or malformed."""


class BlockRangeError(ModelError, IndexError):
    """Raised when a block range or ramp index lies outside the model."""


class InvalidInputError(ModelError, ValueError):
    """Raised when inputs do not match the model's input spec (shape, dtype, kind)."""


class InvalidStateError(ModelError, ValueError):
    """Raised when a batch state's fields disagree with the spec a split expects."""


class PolicyError(ModelError, ValueError):
    """Raised for an unknown exit policy or a threshold outside its range."""
