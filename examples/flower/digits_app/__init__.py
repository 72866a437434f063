"""A Flower app on scikit-learn's digits, audited by fedmia (examples/flower/, docs/flower.md)."""
