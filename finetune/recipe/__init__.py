"""The recipe: what a run is asked to do. The typed, frozen schema with every default and every numeric
bound (schema.py), loading YAML with `base:` and `key=value` overrides and checking every value (load.py),
converting values by their declared type (typed.py), the checks that a named backbone, data source or weights
file exists (locate.py), and reading files finetune did not write itself, bounded: regular files only, YAML
as plain data of at most 1 MB, without aliases or a silently repeated key (userfiles.py).

Imports only `finetune.errors` and third-party libraries: every other stage reads its own section of a
recipe, so this package sits at the bottom.
"""
