"""plugtron_hf_bridge: convert Hugging Face checkpoints to and from megatron-core GPT models.

The package root imports nothing on purpose: plugin discovery may import it
just to read metadata, and that must not pull in torch or transformers.
Import the submodules you need:

- ``plugtron_hf_bridge.errors``: the exception types.
- ``plugtron_hf_bridge.safetensors_io``: safe, lazy checkpoint reading and sharded writing.
- ``plugtron_hf_bridge.hf_config``: HF ``config.json`` <-> megatron config fields.
- ``plugtron_hf_bridge.rope``: the RoPE part of that translation (llama-3, linear, YaRN).
- ``plugtron_hf_bridge.mappings``: tensor name/layout tables and the pure repacking functions.
- ``plugtron_hf_bridge.activations``: activation functions referenced by import path.
"""
