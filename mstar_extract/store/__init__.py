"""Output files: atomic writes, feature bags, coordinate files, manifests (design §4)."""
