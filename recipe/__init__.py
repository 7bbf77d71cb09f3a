"""The decoder-only compute-optimal recipe (Ziarko et al., 2024; Eq. 15-17)."""
