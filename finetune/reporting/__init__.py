"""Reporting: turning per-sample results and per-epoch records into numbers and files a person reads:
metrics (metrics.py), PNG plots (plots.py), the evaluation report of `finetune eval` and of the val split
after training (evaluation.py), the hard examples to review (review.py), and all of these for a
multi-label run (multilabel.py: mAP, F1 at a threshold, per-label AP).

Pure functions of tensors and records that were already computed and gathered: nothing here runs a
model or talks to Accelerate, so the training loop calls it every epoch. May import `finetune.recipe`,
`finetune.data` and `finetune.errors`; never the model or training.
"""
