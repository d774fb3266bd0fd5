"""Artifact formats: what a bundle's stage can hold, one :class:`Format` record each.

A *format* (onnx, openvino, tflite) is the kind of model file a bundle holds; a *runtime*
(:mod:`stagewise.runtimes`) names the format it runs. Everything that lists formats derives from
:data:`FORMATS`: the manifest schema's ``artifacts`` keys, :meth:`stagewise.bundle.Bundle.formats`,
the runtimes' checks and the converter's ``--format`` check. A new format is one call::

    register_format(Format("npz", suffixes=(".npz",), description="numpy arrays"))

The converter side writes a format through an exporter registered under the same name
(:func:`stagewise.converters.export.register_exporter`); a format no exporter writes can still be
run from bundles built another way.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidOptionError, registered


@dataclass(frozen=True)
class Format:
    """An artifact format: its ``name`` (the manifest's ``artifacts`` key and the bundle folder its files go
    to), the ``suffixes`` of one stage's files (main model file first, e.g. ``(".xml", ".bin")``) and a
    one-line ``description``."""

    name: str
    suffixes: tuple[str, ...]
    description: str = ""

    def files(self, stem: str) -> list[str]:
        """The bundle paths of one stage's files: ``<format>/<stem><suffix>``, main model file first."""
        return [f"{self.name}/{stem}{suffix}" for suffix in self.suffixes]


FORMATS: dict[str, Format] = {}
"""The registered formats by name, in registration order (the order :meth:`Bundle.formats` lists them)."""


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` (or replace the format of the same name); returns it."""
    if not fmt.suffixes:
        raise InvalidOptionError(f"format {fmt.name!r} names no file suffixes; give its main model file's first")
    FORMATS[fmt.name] = fmt
    return fmt


def format_named(name: str) -> Format:
    """The registered format ``name``; an unknown name is an :class:`InvalidOptionError` that lists them."""
    return registered(FORMATS, "artifact format", name)


register_format(Format("onnx", (".onnx",), "ONNX graph"))
register_format(Format("openvino", (".xml", ".bin"), "OpenVINO IR (graph and weights)"))
register_format(Format("tflite", (".tflite",), "TFLite flatbuffer"))
