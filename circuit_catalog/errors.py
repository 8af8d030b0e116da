"""Errors a user can cause, one type per kind.

The CLI catches `UserError` once and prints it as one line; anything else is a bug and raises.
"""


def first_line(exc: BaseException | str) -> str:
    """The first line of an exception's text (or its type name): user errors print on one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """Base class: a problem with the user's input, printed as one line."""


class ModelError(UserError):
    """The model cannot be resolved or loaded."""


class DeviceError(UserError):
    """A device or dtype that is unknown, or not available on this machine."""


class TranscoderError(UserError):
    """A transcoder file is missing, malformed or does not fit the model."""


class DatasetError(UserError):
    """A dataset cannot be found or read."""


class CatalogDirError(UserError):
    """A catalog directory is missing, incomplete, or was built with other settings."""


class OutputError(UserError):
    """A file the user asked for cannot be written there (a directory, a path under a file, no permission)."""


class CatalogBusy(UserError):
    """Another process holds the catalog's writer lock."""


class UnknownFeature(UserError):
    """A feature id that is malformed or not in the catalog."""


class ReportError(UserError):
    """A report cannot be made from what was given (e.g. an unreadable evaluation file)."""


class InterventionError(UserError):
    """A malformed or impossible intervention (unknown feature, position out of range, NaN value, ...)."""


class AttributionError(UserError):
    """A prompt or target the attribution cannot use (empty prompt, multi-token target, ...)."""


class StoreError(UserError):
    """A store cannot be reached, authenticated against, or loaded."""


class CypherError(UserError):
    """A Cypher statement is malformed, or writes where only reads are allowed."""


class SqlError(UserError):
    """A statement that is malformed or not read-only."""


class UnknownPrompt(UserError):
    """A prompt id, node id, token or logit that is malformed or not in the catalog's graphs."""


class UnknownHead(UserError):
    """An attention-head id that is malformed or not in the model."""


class ExecutorError(UserError):
    """The distributed executor cannot run: Ray missing, a cluster that cannot be reached, a worker that keeps dying."""
