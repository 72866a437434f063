"""The foundation: configuration, kinds and their registries, parameters, file contracts.

Also code fingerprints and logging. It imports nothing above it, and no torch.
"""
