"""Input pipeline: torch DataLoaders (or any iterable of batches) to device batches."""

from orchard_jax.data.adapter import device_batches, make_loader

__all__ = ["device_batches", "make_loader"]
