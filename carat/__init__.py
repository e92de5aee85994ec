"""carat: CARAT multimodal multi-label emotion recognition on long, unaligned sequences.

The package is split by concept: ``carat.data`` (ingestion, shards, loader), ``carat.model`` (the network
and its losses, free of distributed code), ``carat.train`` (the one training loop and its launchers).
"""

__version__ = "0.1.0"
