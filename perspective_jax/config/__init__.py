"""Configuration: schema (frozen dataclasses), YAML loading, every closed set of choices,
and where routed FFNs live in a parameter tree."""

from perspective_jax.config.loader import (apply_overrides, from_dict, load_config,
                                           save_config, to_dict)
from perspective_jax.config.schema import (CheckpointConfig, DataConfig, MeshConfig, SafetyConfig,
                                           ModelConfig, MoEConfig, PerspectiveConfig,
                                           TernaryConfig, TrainConfig)

__all__ = [
    "SafetyConfig",
    "apply_overrides", "from_dict", "load_config", "save_config", "to_dict",
    "CheckpointConfig", "DataConfig", "MeshConfig", "ModelConfig", "MoEConfig",
    "PerspectiveConfig", "TernaryConfig", "TrainConfig",
]
