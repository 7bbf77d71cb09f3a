"""Deploying one size: export as a standalone model, and 2D adaptive retrieval (Eq. 1, 14)."""
