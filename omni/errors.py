"""Errors shared across the data path."""


class SampleError(ValueError):
    """A sample cannot be used (bad field, placeholder/media mismatch, too long); the message
    names the sample, its shard and the field."""
