"""Errors a user can cause; the CLI prints them as one line and exits 1."""


class QueueError(Exception):
    """A user-facing error whose message is a single, self-explaining line."""

    exit_code = 1


class InvalidInput(QueueError):
    """Input that can never be valid (bad JSON, wrong type, out of range)."""


class NotFound(QueueError):
    """A job id (or config key) that does not exist."""


class Conflict(QueueError):
    """A request that is valid but not in the job's current state (e.g. retry of a live job)."""


class StorageError(QueueError):
    """The database cannot be opened or used (read-only, corrupt, newer schema)."""
