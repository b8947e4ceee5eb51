"""queuectl: a persistent background job queue for shell commands."""

__version__ = "1.0.0"
