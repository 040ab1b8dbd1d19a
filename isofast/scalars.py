"""The scalars of the public API: Python's ints and floats and numpy's, never bools.

numpy scalars arrive from arrays and configs (``np.int64`` timesteps, ``np.float32`` lambdas); they
are accepted wherever a Python int or float is, and turned into one. Booleans are integers to
Python, but a bool where a number belongs is a mistake, so they are refused.
"""
from __future__ import annotations

import numbers


def is_bool(value: object) -> bool:
    """True for a bool or numpy's bool (``np.bool_``, named ``bool`` since numpy 2), without importing numpy."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def is_integer(value: object) -> bool:
    """True for an int or a numpy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_real(value: object) -> bool:
    """True for an int, a float, or a numpy integer or float (not a bool)."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def integer(name: str, value: object) -> int:
    """``value`` as a Python int; TypeError naming ``name`` if it is not an integer scalar."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def real(name: str, value: object) -> float:
    """``value`` as a Python float; TypeError naming ``name`` if it is not a real scalar."""
    if not is_real(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)
