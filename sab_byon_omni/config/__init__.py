"""Typed configuration: one dataclass per concern (:mod:`.schema`), read from YAML files, flags and
checkpoints (:mod:`.parse`).

A field's type says what its value may be (``Literal`` for a choice) and ``metadata["help"]`` what
it means; the CLI builds its flags from both. jsonargparse checks a merged mapping against the types
and builds the dataclasses; ``__post_init__`` checks what a type cannot say (ranges, limits, one
field against another). Field names are unique across sections, so ``train.learning_rate`` and
``learning_rate`` address the same value, and a flat YAML with the guide's keys (``epochs: 3``,
``seq_len: 1024``, ...) is understood as well as a sectioned one. A preset names a whole set of
model dimensions (``ModelConfig.from_name``), filled in as a mapping is built; dimensions given
explicitly win.
"""

from sab_byon_omni.config.parse import (
                                        MAX_CONFIG_BYTES,
                                        RENAMED,
                                        apply_overrides,
                                        build_config,
                                        config_dirs,
                                        field_help,
                                        load_config,
                                        load_yaml,
                                        named_configs,
                                        renamed,
                                        replace,
                                        resolve_config,
)
from sab_byon_omni.config.schema import (
                                        EXPORT_FORMATS,
                                        FIELD_SECTION,
                                        FRAGMERGENT_MODES,
                                        GGUF_TYPES,
                                        LIMITS,
                                        MEMORY_SAVING,
                                        OPTIMIZERS,
                                        PARALLEL,
                                        PRECISIONS,
                                        PRESET_FIELDS,
                                        PRESETS,
                                        SCHEDULES,
                                        SECTIONS,
                                        TOKENIZERS,
                                        TRACKERS,
                                        DataConfig,
                                        ModelConfig,
                                        RunConfig,
                                        TrainConfig,
                                        did_you_mean,
                                        fld,
)

__all__ = ["MAX_CONFIG_BYTES", "RENAMED", "apply_overrides", "build_config", "config_dirs", "field_help",
           "load_config", "load_yaml", "named_configs", "renamed", "replace", "resolve_config", "EXPORT_FORMATS",
           "FIELD_SECTION", "FRAGMERGENT_MODES", "GGUF_TYPES", "LIMITS", "MEMORY_SAVING", "OPTIMIZERS", "PARALLEL",
           "PRECISIONS", "PRESET_FIELDS", "PRESETS", "SCHEDULES", "SECTIONS", "TOKENIZERS", "TRACKERS", "DataConfig",
           "ModelConfig", "RunConfig", "TrainConfig", "did_you_mean", "fld"]
