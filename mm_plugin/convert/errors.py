"""The error every conversion failure is reported as (the CLI prints it and exits with 2)."""


class ConversionError(ValueError):
    """Input that cannot be converted. The message names the file, the key, and what was expected
    against what was found."""
