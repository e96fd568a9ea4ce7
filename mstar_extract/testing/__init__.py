"""Test support that ships with the package: a builder of real pyramidal test slides with ground truth.

See :mod:`mstar_extract.testing.fixtures` (writers, ``build_fixture_set``, truth format) and
:mod:`mstar_extract.testing.scene` (the µm-defined synthetic scenes) and :mod:`mstar_extract.testing.cli` (run this
checkout's command line as a subprocess). Import from those modules directly.
"""
