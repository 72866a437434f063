"""Federated learning: datasets, partitions, models, flat model state, FedAvg, defenses.

The defenses are what a client applies to its training data or its upload.
"""
