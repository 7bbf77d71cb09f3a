"""MRL classification with the sizes of a 2D encoder: nested heads and the 2D cascade (Eq.
18-20)."""
