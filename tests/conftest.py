"""Shared pytest fixtures. Keep this file small and generic; feature-specific fixtures live in their test files."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mstar_extract.testing.fixtures import FixtureSlide, build_fixture_set

if TYPE_CHECKING:
    import torch


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background of a non-interactive shell (``pytest &``, ``nohup``) inherits an ignored
    SIGINT, and so would every process it starts: the tests that press Ctrl-C on a child would wait forever. A
    handler here (reset to the default in children at exec) gives the children Python's normal SIGINT."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def fixture_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FixtureSlide]:
    """The real test slides (built once per session, a few seconds): see ``build_fixture_set`` for names/layout."""
    return build_fixture_set(tmp_path_factory.mktemp("fixture_slides"), small=True)


@pytest.fixture(scope="session")
def fixture_root(fixture_slides: dict[str, FixtureSlide]) -> Path:
    """The folder holding ``slides/``, ``nometa/`` and ``broken/`` of :func:`fixture_slides`."""
    return fixture_slides["svs40"].path.parent.parent


@pytest.fixture(scope="session")
def vit_large() -> torch.nn.Module:
    """The reference ViT-L (:func:`mstar_extract.testing.official.reference_vit_large`), built once for the session:
    the ViT-L tests (test_fidelity, test_extract) share it."""
    from mstar_extract.testing.official import reference_vit_large

    return reference_vit_large()
