"""Error types a user can act on. Each message names the file, sample or key at fault."""


class CaratError(Exception):
    """Base class of carat's user-facing errors (command lines print them without a traceback)."""


class ConfigError(CaratError, ValueError):
    """A configuration value, key or file is wrong; the message names the key and what is allowed."""


class DataError(CaratError, ValueError):
    """Input data is missing, corrupt or inconsistent; the message names the file and sample."""
