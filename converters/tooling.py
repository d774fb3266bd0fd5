"""Small helpers every converter module shares: tool versions, quiet tool runs, lazily loaded plug-ins."""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator, Mapping

from stagewise.errors import ConversionError, MissingExtraError, registered


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


@dataclass(frozen=True)
class Plugin:
    """A converter-side extension, imported on first use: the ``name`` it is registered under, the class it is
    (``target``, as ``"package.module:Class"``) and the ``stagewise[...]`` ``extra`` that installs what the
    module imports."""

    name: str
    target: str
    extra: str

    def load(self, purpose: str) -> Any:
        """An instance of the ``target`` class; a missing dependency of its module is a :class:`MissingExtraError`
        naming the extra (``purpose`` says what needed it)."""
        module, _, name = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), name)()
        except ImportError as exc:
            raise MissingExtraError(f"{purpose} needs {exc.name or 'a package'}, which is not installed: "
                                    f'pip install "stagewise[{self.extra}]" ({exc})') from exc


def plugin(table: Mapping[str, Plugin], key: str, kind: str, purpose: str) -> Any:
    """The loaded :class:`Plugin` ``table[key]`` (a source adapter or an exporter); an unknown ``key`` is a
    :class:`ConversionError` listing the ``kind``s there are."""
    return registered(table, kind, key, ConversionError).load(purpose)
