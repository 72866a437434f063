"""Examples of using fedmia (a package, so that a config can name a plugin kept here)."""
