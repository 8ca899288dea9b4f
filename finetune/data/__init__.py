"""Data: sources -> the run's splits -> the backbone's transforms -> one device's loader.

Decoding any image file to 8-bit RGB (images.py), labelled samples decoded lazily (samples.py), reading a
source string or in-memory data into them (sources.py), whether a hub dataset can be had offline
(hub.py), bad files and the data report (badimages.py),
splits with one class list (splits.py), transforms (transforms.py), the decoded-image cache (decoded.py)
and the augmentation that runs batched on the training device (device_augment.py), loaders that survive
bad files and reseed per epoch (loaders.py), which images an epoch draws and class weights (sampling.py),
what the data layer asks of a task about its targets and the default, one class per image (targets.py),
and `check-data` (checkdata.py).

May import `finetune.recipe` and `finetune.errors`; never the model, training or reporting.
"""
