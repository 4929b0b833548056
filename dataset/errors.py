"""Errors the data layer raises for bad input; command lines print them as one line."""


class DatasetError(Exception):
    """A data folder, image, mask or support list is missing or malformed (the message names it)."""
