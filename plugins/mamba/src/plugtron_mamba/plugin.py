"""Registration of the Mamba family.

The family is not registered yet: its config, builder and hybrid stack are
still being written (see the open Mamba issue). The pure-PyTorch Mamba-2 mixer
in :mod:`plugtron_mamba.torch_impl` is usable and tested on its own.
"""
