"""Attrs validators shared by every settings class.

Errors read ``"<field>: <reason>"``: ``trio_cluster.config`` relies on that
prefix to report a bad value under its full path (``send_retry.max_attempts: ...``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def number(
    *,
    minimum: float,
    maximum: float = math.inf,
    integer: bool = False,
    inclusive: bool = True,
) -> Validator:
    """A finite number (an int when ``integer``) from ``minimum`` (excluded unless
    ``inclusive``) to ``maximum``. A bool is refused: ``True`` is no mailbox size."""
    kind = "an integer" if integer else "a finite number"
    relation = ">=" if inclusive else ">"

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integer and not isinstance(value, int))
        ):
            raise TypeError(f"{attribute.name}: must be {kind} (got {value!r})")
        if not integer:
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an int too large for a float
                finite = False
            if not finite:
                raise ValueError(f"{attribute.name}: must be {kind} (got {value!r})")
        if value < minimum or (value == minimum and not inclusive):
            raise ValueError(f"{attribute.name}: must be {relation} {minimum:g} (got {value!r})")
        if value > maximum:
            raise ValueError(f"{attribute.name}: must be <= {maximum:g} (got {value!r})")

    return check
