"""Errors the package raises on purpose, in a leaf module so any layer can raise them without
importing the layer that catches them."""


class ConfigError(ValueError):
    """A config value, file or override that cannot run; the message names the key."""


class EngineError(RuntimeError):
    """A rollout server did not start, died, or stopped answering."""
