"""Reporting: turning per-sample results and per-epoch records into numbers and files a person reads:
metrics (metrics.py), PNG plots (plots.py), the evaluation report of `finetune eval` and of the val split
after training (evaluation.py) and the hard examples to review (review.py). The tasks (finetune/tasks/)
call them, and add their own: per-label AP for label sets, predicted-vs-true for numbers.

Pure functions of tensors and records that were already computed and gathered: nothing here runs a
model or talks to Accelerate, so the training loop calls it every epoch. May import `finetune.recipe`,
`finetune.data` and `finetune.errors`; never the model or training.
"""
