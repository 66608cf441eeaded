"""plugtron_hf_bridge: convert Hugging Face checkpoints to and from megatron-core GPT models.

The package root imports nothing on purpose: plugin discovery imports
``plugtron_hf_bridge.plugin``, and that must not pull in torch or transformers.
Import the submodules you need:

- ``plugin``: converter records for the five built-in architectures and the commands.
- ``adapter``: the :class:`~plugtron_hf_bridge.adapter.HFAdapter` protocol a third party
  implements to add an architecture, and the built-in GPT adapters.
- ``importer`` / ``exporter``: HF safetensors -> megatron model (each rank reads its own
  slices) and back (gathered tensor by tensor, written atomically).
- ``checkpoint``: megatron-core distributed checkpoints, loadable at another TP/PP layout.
- ``verify``: logit parity against transformers.
- ``cli`` / ``demo``: ``plugtron convert``, ``plugtron verify``, ``plugtron hf-demo``.
- ``errors``: the exception types (all :class:`plugtron.PlugtronError`).
- ``safetensors_io`` / ``region_io``: safe checkpoint reading, region reads, sharded writing.
- ``hf_config`` / ``rope``: HF ``config.json`` <-> megatron config fields.
- ``mappings`` / ``pieces``: tensor name/layout tables, repacking, per-shard row layouts.
"""
