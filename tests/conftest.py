"""Shared pytest fixtures. Keep this file small and generic; feature-specific fixtures live in their test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mstar_extract.testing.fixtures import FixtureSlide, build_fixture_set


@pytest.fixture(scope="session")
def fixture_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FixtureSlide]:
    """The real test slides (built once per session, a few seconds): see ``build_fixture_set`` for names/layout."""
    return build_fixture_set(tmp_path_factory.mktemp("fixture_slides"), small=True)


@pytest.fixture(scope="session")
def fixture_root(fixture_slides: dict[str, FixtureSlide]) -> Path:
    """The folder holding ``slides/``, ``nometa/`` and ``broken/`` of :func:`fixture_slides`."""
    return fixture_slides["svs40"].path.parent.parent
