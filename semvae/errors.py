"""The errors a run reports in one line.

Library code raises these and never exits the process; only ``run.py`` turns them into an exit status and one line
on stderr. Each subclass lives with its concept (``ConfigError`` in config.py, ``DataError`` in data.py,
``CheckpointError`` in checkpoints.py, ``RunDirError`` in rundir.py). This module imports nothing, so that run.py
can catch them all before torch is imported.
"""


class InputError(RuntimeError):
    """What the run was given (config, files, run folder) cannot be run; the message names the key or the file and
    what to do. run.py prints it as one line and exits with status 2."""


class SweepFailed(RuntimeError):
    """A multirun ended with failed jobs (listed in the sweep folder's ``failures.json``); run.py exits with 1."""


class Abort(BaseException):  # noqa: N818 - a request to end the command, as KeyboardInterrupt is
    """Carries ``error`` out of a Hydra callback, which turns an ``Exception`` raised there into a warning and goes
    on; run.py reports ``error`` as it reports the same error raised anywhere else."""

    def __init__(self, error: Exception):
        self.error = error
        super().__init__(str(error))
