"""Errors the package raises on purpose, in a leaf module so any layer can raise them without
importing the layer that catches them."""


class ConfigError(ValueError):
    """A config value, file or override that cannot run; the message names the key."""


class EngineError(RuntimeError):
    """A rollout server did not start, died, or stopped answering."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or cannot be read back as it was saved; the message
    names its folder (and the file) and what is wrong."""


class OutputDirError(RuntimeError):
    """The output folder cannot be used as asked: another job holds it, or it holds an earlier
    run that this one would silently mix into or replace."""
