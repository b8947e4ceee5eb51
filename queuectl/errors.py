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


class DuplicateKey(Exception):
    """A backend refused an insert: the id or active unique key is taken. Not user-facing:
    models retry the enqueue (their checks then see the winner) or turn it into a Conflict."""

    def __init__(self, what: str, value: "str | None" = None) -> None:
        super().__init__(f"duplicate {what}" + (f" {value!r}" if value is not None else ""))
        self.what = what  # "id" or "unique_key"
        self.value = value
