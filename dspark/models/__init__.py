"""Target models: configuration, loading and the lean PyTorch implementation."""
