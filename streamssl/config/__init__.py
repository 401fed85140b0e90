"""Run configuration: one frozen dataclass per stage of the flow, resolved in layers.

    dataclass defaults < TOML profile (pipelines/*.toml) < STREAMSSL_* environment < --set a.b=v overrides

Every field carries its help text (with tuning advice) and its allowed range in the field metadata;
``resolve`` checks each layer against them so that an unknown key, a wrong type or an out-of-range value
fails once, with one message that names the key and the layer it came from. Values are merged by key
presence, never by truthiness: 0, false and "" survive.

Environment variables are ``STREAMSSL_<SECTION>_<KEY>`` (``STREAMSSL_LEARNER_BASE_LR=0.3``); override and
environment values are parsed as TOML values when they parse (``[224, 96]``, ``true``, ``0.05``), else
taken as plain strings; a list field also accepts ``224,96``.
"""

from streamssl.config.layers import describe, env_layer, find_profile, overrides_layer, resolve
from streamssl.config.sections import (
    DEBUG_ENV,
    DEFAULT_PROFILE,
    ENV_PREFIX,
    SECTIONS,
    AugmentConfig,
    BYOLConfig,
    CheckpointConfig,
    CollapseConfig,
    Config,
    ConfigError,
    DeepClusterConfig,
    DistConfig,
    LearnerConfig,
    MetricsConfig,
    MoCoConfig,
    ModelConfig,
    NPIDConfig,
    ProbeConfig,
    ReplayConfig,
    RunConfig,
    SimCLRConfig,
    SourceConfig,
    StoreConfig,
)

__all__ = [
    "DEBUG_ENV", "DEFAULT_PROFILE", "ENV_PREFIX", "SECTIONS", "AugmentConfig", "BYOLConfig", "CheckpointConfig",
    "CollapseConfig", "Config", "ConfigError", "DeepClusterConfig", "DistConfig", "LearnerConfig", "MetricsConfig",
    "MoCoConfig", "ModelConfig", "NPIDConfig", "ProbeConfig", "ReplayConfig", "RunConfig", "SimCLRConfig",
    "SourceConfig", "StoreConfig", "describe", "env_layer", "find_profile", "overrides_layer", "resolve",
]
