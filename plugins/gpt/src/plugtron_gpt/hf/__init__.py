"""Hugging Face architectures of the GPT family: one small declarative module each.

The conversion engine (``plugtron-hf-bridge``) knows no architecture and
imports no family; it finds these through the converter records this family
registers. Layout:

- :mod:`.architecture`: :class:`~.architecture.HFArchitecture`, an architecture as data
  (config schema, config translation both ways, tensor table);
- :mod:`.adapter`: :class:`~.adapter.GPTAdapter`, what the engine loads for one;
- :mod:`.fields`: plain megatron field dicts <-> ``GPTModelConfig``;
- :mod:`.rope`: HF ``rope_parameters`` <-> megatron rotary fields;
- :mod:`.llama` and the modules derived from it (:mod:`.mistral`, :mod:`.qwen2`,
  :mod:`.qwen3` ...), :mod:`.gpt2`;
- :mod:`.catalogue`: the list of built-in architectures, and lookups by name.

The vocabulary the tables and config readers are written in is the core's
(:mod:`plugtron.conversion`). Importing this package needs no torch.
"""
