"""Small helpers with no better home."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


class NoPublicConstructor(type):
    """A metaclass for classes users get from a factory, never build themselves.

    ``Runner(...)`` raises TypeError; the factory calls ``Runner._create(...)``.
    (The idea is trio's ``_util.NoPublicConstructor``.)
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor")

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc, no-any-return]
