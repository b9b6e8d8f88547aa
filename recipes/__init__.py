"""The shipped recipes, installed as the package ``segprompt.recipes`` (see setup.py and
docs/recipes.md). Only the YAML files beside this one matter; this file makes the folder a
package that editable and regular installs both map."""
