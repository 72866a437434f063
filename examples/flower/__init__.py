"""Audit a Flower run (docs/flower.md); digits_app is the Flower app."""
