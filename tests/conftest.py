"""Fixtures shared by the tests, and the markers of the quick loop.

Helpers live in modules the tests import: stagewise.testing (scripted stages, bundles and a fake
runtime), tests/toy_images.py, tests/toy_bundle.py, tests/toy_models.py. Markers (registered in
pyproject.toml) are applied here, so test files need not carry them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from toy_images import make_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))
