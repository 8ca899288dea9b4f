"""The shipped recipes (YAML data, no code). Installed as `finetune.recipes` so that a recipe name such as
`quickstart` resolves from any directory: `finetune train quickstart`."""
