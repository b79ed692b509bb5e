"""Errors a caller can act on; each carries a message written for a person."""


class QuantcoreError(Exception):
    """Base class: something about the request, not a bug."""


class ModelNotFoundError(QuantcoreError):
    """The model id / revision could not be resolved."""


class UnsupportedModelError(QuantcoreError):
    """The model loads, but its structure is not one the walker handles."""


class BadRequestError(QuantcoreError):
    """The quantization request is inconsistent with the model (e.g. group size)."""


class CancelledError(QuantcoreError):
    """The caller asked to stop; raised between layers."""
