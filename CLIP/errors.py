"""Errors the backbone raises for bad input; command lines print them as one line."""


class CLIPError(Exception):
    """Base class: a user-facing problem with a config, a checkpoint or the tokenizer."""


class ConfigError(CLIPError):
    """A model config is unknown, unreadable or inconsistent."""


class CheckpointError(CLIPError):
    """A checkpoint is missing, unreadable, or does not fit the architecture."""


class TokenizerError(CLIPError):
    """The BPE merges file is missing or corrupt, or a text is too long."""
