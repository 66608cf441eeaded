"""Model configs: attrs classes that embed megatron-core's TransformerConfig."""

from plugtron.config.base import ModelConfig, model_config
from plugtron.config.io import DEFAULT_FILENAME, from_dict, load, save, to_dict

__all__ = ["DEFAULT_FILENAME", "ModelConfig", "from_dict", "load", "model_config", "save", "to_dict"]
