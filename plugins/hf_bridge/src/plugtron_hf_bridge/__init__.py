"""plugtron_hf_bridge: convert Hugging Face checkpoints to and from megatron-core GPT models.

The package root imports nothing on purpose: plugin discovery imports
``plugtron_hf_bridge.plugin``, and that must not pull in torch or transformers.
Import the submodules you need:

- ``plugin``: converter records for the five built-in architectures and the commands.
- ``adapter``: the :class:`~plugtron_hf_bridge.adapter.HFAdapter` protocol a third party
  implements to add an architecture, and the built-in GPT adapters.
- ``importer`` / ``exporter`` / ``export_rows``: HF safetensors -> megatron model (each rank
  reads its own slices) and back (gathered tensor by tensor, cut into views, written atomically).
- ``preflight``: the checks before a conversion, torch-free in a launcher; the one tensor-table check.
- ``checkpoint``: megatron-core distributed checkpoints, loadable at another TP/PP layout;
  ``dcp_metadata`` / ``dcp_strategies`` / ``dcp_writer`` / ``dcp_direct``: reading them safely,
  writing them in-process, reading plain records straight into parameters.
- ``verify``: logit parity against transformers.
- ``cli`` / ``demo`` / ``progress``: ``plugtron convert``, ``plugtron verify``, ``plugtron hf-demo``.
- ``libraries``: importing megatron-core without torch's compiler stack; collector settings.
- ``errors``: the exception types (all :class:`plugtron.PlugtronError`).
- ``safetensors_header`` / ``safetensors_io`` / ``safetensors_write`` / ``region_io``: safe
  checkpoint reading (headers without torch), region reads, sharded writing of views.
- ``hf_config`` / ``hf_defaults`` / ``rope``: HF ``config.json`` <-> megatron config fields.
- ``mappings`` / ``pieces``: tensor name/layout tables, repacking, per-shard row layouts.
"""
