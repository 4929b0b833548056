"""Errors of the method and the engine; command lines print them as one line."""


class MVFAError(Exception):
    """A user-facing problem with a run: its flags, checkpoints or data (the message says what to do)."""


class CheckpointFormatError(MVFAError, ValueError):
    """An adapter checkpoint is unreadable or does not fit the model."""


def single_line(text) -> str:
    """`text` with every run of white space (line breaks too) as one space: an error line's message."""
    return " ".join(str(text).split())
