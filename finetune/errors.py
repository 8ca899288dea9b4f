"""The one exception type for mistakes a user can fix (bad recipe, missing data, bad weights file), and
its kind for a run stopped on request (`Stopped`).

The CLI catches it once and prints its message without a traceback; everything else is a bug and keeps
its traceback.
"""


class FinetuneError(Exception):
    """A user-fixable problem. The message says what is wrong and what to do about it."""

    def __init__(self, message: str, *, raised_on_every_process: bool = False, reported_elsewhere: bool = False):
        super().__init__(message)
        # True on the processes that learnt of another process's exception: that process prints it.
        self.reported_elsewhere = reported_elsewhere
        # True when every process of a distributed run raises this same error (a fault they stopped on
        # together): the CLI then prints it once, from the main process, instead of once per process.
        self.raised_on_every_process = raised_on_every_process


class Stopped(FinetuneError):
    """A run stopped on request (a stop signal), not by a mistake. The message begins "stopped by" and says
    what was kept and the command that continues; the CLI prints it as a stop, not an error, and exits
    with the shell's code for the signal, 128 + its number."""

    def __init__(self, message: str, signum: int, *, raised_on_every_process: bool = False):
        super().__init__(message, raised_on_every_process=raised_on_every_process)
        self.exit_code = 128 + signum
