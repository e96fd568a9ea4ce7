"""Test support that ships with the package: a builder of real pyramidal test slides with ground truth, and a
detector of host-device synchronisations.

See :mod:`mstar_extract.testing.fixtures` (writers, ``build_fixture_set``, truth format),
:mod:`mstar_extract.testing.scene` (the µm-defined synthetic scenes), :mod:`mstar_extract.testing.cli` (run this
checkout's command line as a subprocess) and :mod:`mstar_extract.testing.syncs` (which torch operations would make
the host wait for a GPU, observed on any device). Import from those modules directly.
"""
