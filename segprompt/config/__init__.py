"""YAML recipes: `base:` inheritance, `--set` overrides and strict, typed validation.

A recipe is a YAML mapping with the sections of :class:`Recipe`. ``base:`` names one file or a
list of files (relative to the recipe, else shipped recipes) whose contents are merged first,
later ones winning; the recipe itself wins over its bases. Mappings merge key by key and lists
are replaced whole. A mapping that names a component (a ``name:`` key) is replaced whole when the
name changes, so a recipe can swap ``model.backbone`` without inheriting the old backbone's options.

Recipes name files the way :func:`resolve_recipe` says (docs/recipes.md): an existing file is
that file; otherwise a name such as ``smoke`` or ``spm/ade20k_r101_spm`` is the recipe shipped with
segprompt (the repository's ``recipes/`` folder, installed as ``segprompt.recipes``).

Validation is strict: an unknown key is an error naming the file that set it, the key path and
the closest valid key; a wrong type names the key and the expected type. Components
(``model.backbone``, heads, ``loss``, ``tuning``) are checked against their constructor's
signature, so every option a recipe can set is an argument of an explicit constructor.

Written by hand rather than with pydantic or OmegaConf because the messages must name the file
in the inheritance chain that set a key and suggest the closest valid key, and component options
are validated from constructor signatures; neither library does either.

The package: :mod:`.schema` (the sections and their types), :mod:`.files` (names, YAML,
inheritance, overrides) and :mod:`.check` (validation).
"""

from segprompt.config.check import (
    RUNTIME_ONLY_KEYS,
    config_diff,
    dump_recipe,
    load_recipe,
    load_yaml_as,
    run_defining_config,
    validate,
)
from segprompt.config.files import (
    parse_override,
    resolve_recipe,
    resolve_tree,
    shipped_name,
    shipped_recipes,
    yaml_load,
)
from segprompt.config.schema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SUPPLIED,
    AtLeast0,
    AtLeast1,
    Beta,
    CheckpointConfig,
    Component,
    DataConfig,
    EvaluationConfig,
    Fraction,
    ModelConfig,
    NonNegative,
    OptimizerConfig,
    ParamGroupConfig,
    Positive,
    Range,
    Recipe,
    RuntimeConfig,
    ScheduleConfig,
    TestPipelineConfig,
    TrainPipelineConfig,
)

__all__ = ["config_diff", "AtLeast0", "AtLeast1", "Beta", "CheckpointConfig", "Component", "DataConfig", "EvaluationConfig", "Fraction",
           "IMAGENET_MEAN", "IMAGENET_STD", "ModelConfig", "NonNegative", "OptimizerConfig",
           "ParamGroupConfig", "Positive", "RUNTIME_ONLY_KEYS", "Range", "Recipe", "SUPPLIED", "RuntimeConfig",
           "ScheduleConfig", "TestPipelineConfig", "TrainPipelineConfig", "dump_recipe", "load_recipe",
           "load_yaml_as", "parse_override", "resolve_recipe", "resolve_tree", "run_defining_config",
           "shipped_name", "shipped_recipes", "validate", "yaml_load"]
