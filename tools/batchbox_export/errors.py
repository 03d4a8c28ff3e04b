"""The one error an export refuses with."""


class ExportError(Exception):
    """A check failed: the model directory is not written."""
