"""Process-level runtime: CPU support for megatron-core and the parallel context."""
