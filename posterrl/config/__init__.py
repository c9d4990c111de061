"""Typed run configuration: YAML with one section per role and per training stage, dotted CLI overrides,
validation before anything starts.

    schema.py    the pydantic sections and `Config`
    validate.py  one cross-field validator per section, what a run needs beyond a valid file, derived sizes
    load.py      YAML and overrides, keys that moved (migrated with a warning), error messages

The closed lists of names (tasks, stages, model and scorer kinds, judge backends) live in posterrl/names.py.
"""

from posterrl.config.load import (
    LEGACY_KEYS,
    ConfigDeprecationWarning,
    ConfigError,
    apply_overrides,
    load_config,
    migrate_legacy_keys,
    parse_overrides,
    validate_dict,
)
from posterrl.config.schema import (
    ClusterConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    DistillConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    RewardConfig,
    RewardModelConfig,
    RlConfig,
    RolloutConfig,
    ScorerConfig,
    SftConfig,
    TextEncoderConfig,
    TransformerConfig,
)
from posterrl.config.validate import IMPLEMENTED_POLICY_KINDS, VALIDATORS
from posterrl.names import STAGE_ORDER

__all__ = [
    "IMPLEMENTED_POLICY_KINDS",
    "LEGACY_KEYS",
    "STAGE_ORDER",
    "VALIDATORS",
    "ClusterConfig",
    "Config",
    "ConfigDeprecationWarning",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DistillConfig",
    "LearnerConfig",
    "LoggingConfig",
    "ModelConfig",
    "RewardConfig",
    "RewardModelConfig",
    "RlConfig",
    "RolloutConfig",
    "ScorerConfig",
    "SftConfig",
    "TextEncoderConfig",
    "TransformerConfig",
    "apply_overrides",
    "load_config",
    "migrate_legacy_keys",
    "parse_overrides",
    "validate_dict",
]
