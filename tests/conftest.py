"""Shared pytest fixtures. Keep this file small and generic; feature-specific fixtures live in their test files."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
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
    _share_the_cores()
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist would hand out files by test count, not this order
        config.option.loadscopereorder = False


def _share_the_cores() -> None:
    """With pytest-xdist's ``-n N``, each worker (and every process it starts) gets its share of the machine's cores
    for torch's threads (``OMP_NUM_THREADS``, unless set), instead of N x all cores fighting over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


LONGEST_FIRST = ("test_fidelity.py", "test_extract_scale.py", "test_pretrain_stage2_vitl.py", "test_extract.py",
                 "test_report.py", "test_whole_run.py", "test_zeroshot.py", "test_reader.py",
                 "test_pretrain_stage2_dist.py", "test_pretrain_dist.py", "test_pretrain_train.py",
                 "test_pretrain_stage2.py", "test_sigterm_storm.py", "test_gpu_ready.py", "test_held_slides.py",
                 "test_formats.py", "test_weights.py", "test_bombs.py", "test_tissue.py", "test_pipeline_cli.py",
                 "test_models.py", "test_launcher.py", "test_layouts.py")
"""The files that take longest (summed test times with two workers, 2-core machine), longest first: they start
first, so that with ``-n 2 --dist loadfile`` the short files fill the gaps at the end instead of one long file
ending the run alone. A file missing here only starts later; the order within a file is kept."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _each_test_leaves_the_environment_as_it_found_it() -> Iterator[None]:
    """An in-process ``mstar`` run (click's test runner) exports its limits (``MSTAR_MAX_*_PIXELS``) and torch sets
    ``TORCHINDUCTOR_CACHE_DIR`` into ``os.environ``: undone after each test, so that no test sees what an earlier one
    in the same worker left (which tests run first in a pytest-xdist worker differs from run to run)."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="session")
def fixture_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FixtureSlide]:
    """The real test slides (built once per session, a few seconds): see ``build_fixture_set`` for names/layout."""
    return build_fixture_set(tmp_path_factory.mktemp("fixture_slides"), small=True)


@pytest.fixture(scope="session")
def fixture_root(fixture_slides: dict[str, FixtureSlide]) -> Path:
    """The folder holding ``slides/``, ``nometa/`` and ``broken/`` of :func:`fixture_slides`."""
    return fixture_slides["svs40"].path.parent.parent


def _shared_folder(config: pytest.Config) -> Path:
    """The folder of this run's temporary folders that every pytest-xdist worker shares (``pytest-N``; each worker's
    own temporary folders are ``pytest-N/popen-gwK``)."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]  # pytest's own, set in every run
    return base.parent if hasattr(config, "workerinput") else base


@pytest.fixture(scope="session")
def vit_large_weights(request: pytest.FixtureRequest) -> Path:
    """The reference ViT-L's random weights as a 1.2 GB file, written once per run and shared by the workers
    (:func:`mstar_extract.testing.official.shared_reference_vit_large`); removed when the run ends."""
    from mstar_extract.testing.official import shared_reference_vit_large

    return shared_reference_vit_large(_shared_folder(request.config))


@pytest.fixture(scope="session")
def vit_large(vit_large_weights: Path) -> torch.nn.Module:
    """The reference ViT-L (:func:`mstar_extract.testing.official.reference_vit_large`), loaded once per test process
    from :func:`vit_large_weights`: the ViT-L tests (test_fidelity, test_extract) share it."""
    from mstar_extract.testing.official import load_reference_vit_large

    return load_reference_vit_large(vit_large_weights)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run's shared ViT-L weights go when the whole run ends (in the process that started the workers)."""
    if not hasattr(session.config, "workerinput") and hasattr(session.config, "_tmp_path_factory"):
        try:
            (_shared_folder(session.config) / "vit_large_random.pth").unlink(missing_ok=True)
        except (OSError, ValueError):  # no temporary folder was made in this run
            pass
