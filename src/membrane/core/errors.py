"""The one exception tree of membrane.

Every error a user can cause or meet derives from :class:`MembraneError`; the CLI prints its
message as one line and exits 1. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class MembraneError(Exception):
    """An error with a message meant for the user, printed as one line."""


class InvalidInput(MembraneError):
    """Input that cannot be accepted. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class NotFound(MembraneError):
    """The named object does not exist."""


class AlreadyExists(MembraneError):
    """An object with that name exists already."""


class StoreError(MembraneError):
    """The store cannot be reached or refused an operation."""


class CompareFailed(StoreError):
    """A compare-and-swap lost: the key changed since it was read."""


class AgentUnavailable(MembraneError):
    """The local agent's API socket does not answer."""


class DatapathError(MembraneError):
    """The kernel refused a change (nft, netlink) after retries."""
