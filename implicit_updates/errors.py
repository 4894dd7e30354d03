"""Errors that say what is wrong and what to do."""


class UnsupportedArchitectureError(ValueError):
    """A model (or one of its parts) the theory cannot be applied to; the message names the part."""


class NonFiniteActivationError(ValueError):
    """NaN or Inf in a captured activation; the message names the block and quantity."""
