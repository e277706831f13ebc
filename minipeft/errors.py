"""The errors minipeft raises for bad input.

Every message names the file, key, field or line at fault and says what was
expected, so the command line can print it as one line instead of a traceback.
All of them derive from :class:`MiniPeftError`; most are also ``ValueError`` so
plain ``except ValueError`` code keeps working.
"""


class MiniPeftError(Exception):
    """Base class: an error about the user's input that the CLI reports as one line."""


class CheckpointError(MiniPeftError, ValueError):
    """A weights file or model folder is unreadable or does not fit the config."""


class ConfigError(MiniPeftError, ValueError):
    """A config file or config field holds a value minipeft cannot use."""


class DataError(MiniPeftError, ValueError):
    """Training or evaluation data is malformed (the message names file and line)."""


class InputError(MiniPeftError, ValueError):
    """Arguments passed to the model are malformed (for example token ids out of range)."""


class DeviceError(MiniPeftError, ValueError):
    """The requested device cannot be used (an unknown name, or CuPy / a GPU missing)."""
