"""plugtron_hf_bridge: the engine that converts Hugging Face checkpoints to and from megatron-core models.

The package root imports nothing on purpose: plugin discovery imports
``plugtron_hf_bridge.plugin``, and that must not pull in torch or transformers.
Import the submodules you need:

- ``plugin``: the commands (architectures are registered by the families that build them).
- ``adapter``: the :class:`~plugtron_hf_bridge.adapter.HFAdapter` protocol an architecture
  satisfies, and how the engine finds one (through the plugin manager only).
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
- ``hf_config``: reading ``config.json`` safely and naming its architecture.

The vocabulary architectures are written in (tensor tables, repacking, row
layouts, strict config reading) is the core's :mod:`plugtron.conversion`; the
architectures themselves live with their families (``plugtron_gpt.hf``,
``plugtron_mamba.hf``).
"""
