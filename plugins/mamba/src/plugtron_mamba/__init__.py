"""The Mamba family plugin (in progress: the pure-PyTorch Mamba-2 mixer lives in torch_impl)."""
