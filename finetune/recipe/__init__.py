"""The recipe: what a run is asked to do. The typed, frozen schema with every default and every numeric
bound (schema.py), loading YAML with `base:` and `key=value` overrides and checking every value (load.py),
reading YAML without a silently repeated key and converting values by their declared type (typed.py), and
the checks that a named backbone, data source or weights file exists (locate.py).

Imports only `finetune.errors` and third-party libraries: every other stage reads its own section of a
recipe, so this package sits at the bottom.
"""
