"""One exception type for problems the user can fix (bad input, bad config, missing file).

The CLI prints these as a single `error: ...` line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class UniremovalError(Exception):
    """A user-facing error whose message says what is wrong and what to do."""


class ConfigError(UniremovalError):
    """A configuration file or override is invalid."""


class CheckpointError(UniremovalError):
    """A checkpoint is missing, truncated, unsafe or does not match the model."""


class DataError(UniremovalError):
    """A dataset, shard or image is missing, corrupt or laid out differently than expected."""
