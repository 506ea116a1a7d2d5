"""Errors the package raises on purpose, in a leaf module so any layer can raise them without
importing the layer that catches them."""
from typing import Optional


class ConfigError(ValueError):
    """A config value, file or override that cannot run; the message names the key."""


class FieldError(ValueError):
    """A field's value that cannot run, in a config dataclass that has no key of its own: an entry
    of a list (data.eval_sets[1]). The message starts with the field's name; the config loader
    puts the entry's key in front (`data.eval_sets[1].temperature must be ...`)."""


class EngineError(RuntimeError):
    """A rollout server did not start, died, or stopped answering."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or cannot be read back as it was saved; the message
    names its folder (and the file) and what is wrong."""


class OutputDirError(RuntimeError):
    """The output folder cannot be used as asked: another job holds it, or it holds an earlier
    run that this one would silently mix into or replace."""


def check_range(section: Optional[str], config, name: str, low=None, high=None, *,
                low_open=False, high_open=False, null: str = "") -> None:
    """Raise ValueError naming `section.name` unless the field's value lies in the interval
    low..high (closed ends unless low_open / high_open; None: unbounded). null: what None
    means, for a field that may be null. The config loader turns the ValueError of a
    dataclass's __post_init__ into a ConfigError. section None: a FieldError naming the field
    alone, for a dataclass whose key the loader knows (an entry of a list)."""
    value = getattr(config, name)
    if value is None and null:
        return
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if above and below:
        return
    if high is None:
        requirement = f"{'>' if low_open else '>='} {low}"
    elif low is None:
        requirement = f"{'<' if high_open else '<='} {high}"
    else:
        requirement = (f"in {'(' if low_open else '['}{low}, {high}"
                       f"{')' if high_open else ']'}")
    shown = f" (or null: {null})" if null else ""
    if section is None:
        raise FieldError(f"{name} must be {requirement}{shown}, got {value}")
    raise ValueError(f"{section}.{name} must be {requirement}{shown}, got {value}")


# Seeds: [0, 2**32), which every RNG the seeds reach accepts (torch's takes up to 2**64 - 1, but
# training.seed is scaled before it gets there: training/sft.py).
SEED_RANGE = dict(low=0, high=2 ** 32, high_open=True)
