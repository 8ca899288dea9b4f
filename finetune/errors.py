"""The one exception type for mistakes a user can fix (bad recipe, missing data, bad weights file).

The CLI catches it once and prints its message without a traceback; everything else is a bug and keeps
its traceback.
"""


class FinetuneError(Exception):
    """A user-fixable problem. The message says what is wrong and what to do about it."""
