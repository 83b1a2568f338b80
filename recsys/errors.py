"""Errors that recsys reports to its users as a plain message (no traceback)."""


class RecsysError(Exception):
    """Base class: a problem with the user's input, data or environment, explained in the message."""


class DataFormatError(RecsysError, ValueError):
    """An input file does not have the promised format; the message names the file and line."""


class ChecksumError(RecsysError):
    """A file's checksum differs from the published one."""


class MissingInputError(RecsysError, FileNotFoundError):
    """A step's input (a raw file, a prepared dataset, a model) does not exist yet."""


class InvalidScoreError(RecsysError, ValueError):
    """A model returned a score that is NaN or infinite: no ranking is made from it; the message names the model."""
