"""Privacy accounting (ε of a mechanism) and the one-run empirical audit."""
