"""patchtrain: patch-level training (Shao et al., 2024) for ppmoe models. Not implemented yet."""
