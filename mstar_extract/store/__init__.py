"""Output files under OUT: where they go (:mod:`~mstar_extract.store.layout`), atomic writes
(:mod:`~mstar_extract.store.atomic`), feature bags (:mod:`~mstar_extract.store.bags`), coordinate files
(:mod:`~mstar_extract.store.coords`) and the settings record (:mod:`~mstar_extract.store.record`).
See docs/architecture.md."""
