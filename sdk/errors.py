"""Exceptions raised by stagewise; each message says what to do about it."""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping, TypeVar

T = TypeVar("T")


class StagewiseError(Exception):
    """Base class of every error stagewise raises on purpose."""


class BundleError(StagewiseError):
    """A bundle cannot be read: missing, unreadable or not a bundle."""


class ManifestError(BundleError):
    """``manifest.json`` does not follow the schema; the message names the field."""


class IntegrityError(BundleError):
    """An artifact's content does not match the sha256 recorded in the manifest."""


class SignatureError(IntegrityError):
    """A bundle is unsigned, signed by no trusted key, or changed after it was signed; or a key is unusable."""


class UnsafeArchiveError(BundleError):
    """A ``.swb`` archive holds a member that would land outside the bundle, twice, or more than its limits allow."""


class StageOutputError(BundleError):
    """A stage's model answered something that is no answer (e.g. NaN scores): the artifact or its runtime is broken."""


class InvalidOptionError(StagewiseError, ValueError):
    """An option value is out of range (NaN, infinite, negative, zero where a count is needed)."""


class ImageInputError(StagewiseError, ValueError):
    """An image has the wrong type, shape or dtype."""


class ImageTooLargeError(ImageInputError):
    """An image has more pixels than the caller allows (read from its header, before decoding)."""


class BackendUnavailableError(StagewiseError):
    """The requested runtime is not installed, or the bundle has no artifact for it."""


class MissingExtraError(StagewiseError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the pip command."""


class UnknownOptionError(StagewiseError):
    """A runtime option that the chosen runtime does not have; the message lists the valid ones."""


class DeviceUnavailableError(StagewiseError):
    """The requested device does not exist on this machine."""


class UnknownOperatingPointError(StagewiseError, KeyError):
    """An operating point name that the bundle does not define."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConversionError(StagewiseError):
    """A model could not be converted; no bundle was written."""


class InvalidCutPointError(ConversionError):
    """A cut point is not one where a single tensor crosses; the message lists valid ones."""


class VerificationError(ConversionError):
    """An exported stage disagrees with its source model beyond tolerance."""


class DatasetError(StagewiseError):
    """Image data cannot be read as a labelled set."""


class TraceLogError(DatasetError):
    """A trace log (JSON lines of answered requests) cannot be read."""


class CalibrationError(StagewiseError):
    """No thresholds satisfy the requested goal."""


class DeadlineExceededError(StagewiseError):
    """A stage run under a deadline was cancelled when the deadline passed (its outputs are lost).

    The executor catches it and answers with the best stage so far (``budget_limited``); it
    reaches a caller only from a session's own ``run_within``.
    """


class CascadeClosedError(StagewiseError):
    """A request reached a :class:`~stagewise.runtimes.Cascade` after its ``close``: load the bundle again."""


def unknown_choice(what: str, value: object, names: Iterable[str]) -> str:
    """The message for a ``value`` that is none of ``names``: the closest name when one is near, then all of them."""
    names = list(names)
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {value!r}{hint} (choose from {', '.join(names)})"


def registered(table: Mapping[str, T], what: str, name: str, error: type[StagewiseError] | None = None) -> T:
    """``table[name]`` of a registry; an unknown ``name`` raises ``error`` (default :class:`InvalidOptionError`)
    with :func:`unknown_choice`'s message for ``what``."""
    if name not in table:
        raise (error or InvalidOptionError)(unknown_choice(what, name, table))
    return table[name]
