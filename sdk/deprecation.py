"""Old names that still work for one release: every one goes through :func:`deprecated`, which warns.

:func:`renamed_keywords` keeps a function's old keyword arguments working and :func:`renamed_attribute`
an old attribute; both call :func:`deprecated`. ``CHANGELOG.md`` lists every deprecated name and
the release that removes it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

REMOVED_IN = "0.3.0"
"""The release that removes the names deprecated in this one."""

F = TypeVar("F", bound=Callable[..., Any])


def deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn (:class:`DeprecationWarning`, pointing at the caller's caller by default) that ``old`` is now ``new``."""
    warnings.warn(f"{old} is deprecated and will be removed in stagewise {REMOVED_IN}; use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorate a function whose keyword ``old`` is now called ``renames[old]``: the old one still works, and warns."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {old}= and {new}=; give only {new}=")
                    deprecated(f"{fn.__qualname__}({old}=...)", f"{new}=...")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def renamed_attribute(old: str, new: str) -> property:
    """A read-only property ``old`` that returns attribute ``new``, and warns."""
    def get(self: Any) -> Any:
        deprecated(f"{type(self).__name__}.{old}", f"{type(self).__name__}.{new}")
        return getattr(self, new)
    return property(get, doc=f"Deprecated: read :attr:`{new}`.")
