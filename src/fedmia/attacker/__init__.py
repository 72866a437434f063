"""The honest-but-curious server: per-sample measures from its view, the attacks, their metrics.

And the uncertainty of those metrics (bootstrap intervals).
"""
