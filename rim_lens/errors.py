"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class RimLensError(Exception):
    """A problem with the user's input (file, config, run directory), not a bug."""


class DataError(RimLensError):
    """A malformed data file or record; the message names the file, line and expectation."""


class ConfigError(RimLensError):
    """A bad recipe or option; the message names the key."""


class RunError(RimLensError):
    """A run directory lacking what was asked of it (model, memory spec, artefact)."""


def clip(value: object, limit: int = 60) -> str:
    """`value` as text cut to `limit` characters: error messages quote fields, never whole files."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def size_text(n: float) -> str:
    """A number of bytes for a message, e.g. "23.5 GiB"."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:,.0f} bytes" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"
