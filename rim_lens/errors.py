"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class RimLensError(Exception):
    """A problem with the user's input (file, config, run directory), not a bug."""


class DataError(RimLensError):
    """A malformed data file or record; the message names the file, line and expectation."""


class ConfigError(RimLensError):
    """A bad recipe or option; the message names the key."""


class RunError(RimLensError):
    """A run directory lacking what was asked of it (model, memory spec, artefact)."""
