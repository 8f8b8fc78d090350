"""The one exception type the CLI turns into a single error line."""


class ZprunerError(Exception):
    """Bad input or an unusable environment, with a message that says what to change."""
