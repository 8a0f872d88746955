"""Uni-Removal: all-in-one real-world image restoration."""
__version__ = "0.1.0"
