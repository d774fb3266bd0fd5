"""Small helpers every converter module shares: tool versions, quiet tool runs, lazily loaded plug-ins."""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator, Mapping

from stagewise.errors import ConversionError, MissingExtraError, unknown_choice


def package_version(package: str) -> str:
    """The installed version of ``package`` (a distribution name), or ``"unknown"``."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence a converter's progress output and warnings (they print to stdout/stderr freely)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def plugin(table: Mapping[str, tuple[str, str, str]], key: str, kind: str, purpose: str) -> Any:
    """An instance of the class ``table[key]`` names (module, class, extra): a source adapter or an
    exporter, imported on first use.

    An unknown ``key`` is a :class:`ConversionError` listing the ``kind``s there are; a missing
    dependency of the module is a :class:`MissingExtraError` naming the extra.
    """
    if key not in table:
        raise ConversionError(unknown_choice(kind, key, table))
    module, name, extra = table[key]
    try:
        return getattr(importlib.import_module(module), name)()
    except ImportError as exc:
        raise MissingExtraError(f"{purpose} needs {exc.name or 'a package'}, which is not installed: "
                                f'pip install "stagewise[{extra}]" ({exc})') from exc
