"""Hugging Face converters of the Mamba family: ``Mamba2ForCausalLM`` and ``NemotronHForCausalLM``.

The HF bridge (``plugtron-hf-bridge``) finds these adapters only through the
``plugtron_register_converters`` records of :mod:`plugtron_mamba.plugin`, by
import path (``plugtron_mamba.hf.adapters:MAMBA2`` / ``:NEMOTRON_H``). Nothing
here is imported when plugtron lists or builds models; the tables and config
readers are written with the core's vocabulary (:mod:`plugtron.conversion`),
never the bridge, and import torch and transformers inside functions only.

* :mod:`.config` - HF ``config.json`` dict <-> :class:`~plugtron_mamba.config.MambaModelConfig`;
* :mod:`.tables` - the tensor tables (HF names <-> megatron MambaModel names);
* :mod:`.adapters` - the two objects the bridge loads.
"""
