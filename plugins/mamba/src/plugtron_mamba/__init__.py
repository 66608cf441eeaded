"""The Mamba family plugin: Mamba-2 and hybrid Mamba/attention/MLP models.

* :mod:`plugtron_mamba.plugin` - registration (family ``mamba``, specs ``mamba_ssm`` and ``torch``);
* :mod:`plugtron_mamba.config` - :class:`MambaModelConfig` (layer pattern, mixer sizes);
* :mod:`plugtron_mamba.builder` - :class:`MambaModelBuilder` (one pipeline stage);
* :mod:`plugtron_mamba.model`, :mod:`plugtron_mamba.stack`, :mod:`plugtron_mamba.layers` - the CPU-capable model;
* :mod:`plugtron_mamba.tp_layout` - where a full tensor's rows live on each tensor-parallel rank;
* :mod:`plugtron_mamba.torch_impl` - the pure-PyTorch Mamba-2 mixer.

Nothing here imports torch at package import.
"""
