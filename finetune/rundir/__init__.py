"""The run directory: what a run writes and reads back, outside the training loop. The folder itself, its
files' names and which run owns it (folder.py), metrics.jsonl's epoch records (records.py), the model card
written from the folder's files (card.py), and `finetune runs`, a line per run directory and whether a
live process still owns it (listing.py).

May import `finetune.recipe`, `finetune.data`, `finetune.model` and `finetune.reporting` (the names of
the files they write, and what the card says about them); never training, which imports this package to
write each epoch into the folder. Scoring a finished run's export (`finetune eval`) stays in
training/evalrun.py: it runs the model on every process of a launch with the loop's Accelerator, and only
finetune/training imports Accelerate; what it reads of the run (recipe.yaml) it names through folder.py.
(The package is not called `runs`: `finetune.runs` is the API's listing function, and a sub-package of
that name would replace it as an attribute of `finetune` once imported.)
"""
