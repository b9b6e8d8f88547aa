"""Which packages the wheel holds; metadata and dependencies are in setup.cfg.

The top-level ``recipes/`` folder ships as the package ``segprompt.recipes`` (its YAML files as
package data), for editable and regular installs alike; ``segprompt.config.shipped_recipes()``
finds it with importlib.resources (docs/recipes.md). setup.cfg alone cannot add a package whose
folder lies outside ``segprompt/`` to ``find:``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["segprompt", "segprompt.*"]), "segprompt.recipes"],
    package_dir={"segprompt.recipes": "recipes"},
    package_data={"segprompt.recipes": ["**/*.yaml"]},
)
