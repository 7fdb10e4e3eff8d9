"""One module per batcher factory."""
