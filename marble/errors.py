"""Errors. `MarbleError`s are caused by the user's input: the CLI prints their message (no traceback)
and exits 2. An `InternalError` is a broken invariant of marble itself (a bug, whatever the input): the
CLI prints the traceback and exits 70.
"""

from __future__ import annotations


class InternalError(RuntimeError):
    """A broken internal invariant (a bug in marble, not in the user's input)."""


class MarbleError(Exception):
    """Base of every error caused by the user's input (files, configs, data), not by a bug."""


class DataError(MarbleError):
    """Bad prompt data; the message names the file, line and field."""


class CheckpointError(MarbleError):
    """A checkpoint that cannot be resumed from; the message names the field."""


class RewardError(MarbleError):
    """A reward that cannot be loaded or scored, or fails its health check."""


class HubError(MarbleError):
    """A model cannot be located or loaded (hub id, local directory, cache); names the model."""


class LockError(MarbleError):
    """Weights differ from the model lock, or the lock does not cover the config; names model and file."""


class CacheError(MarbleError):
    """A cached snapshot is missing, partial or tampered with; the message names the file."""


class StorageError(MarbleError):
    """Writing an output failed (disk full, quota, read-only, I/O error); names the path and the bytes."""


class RegistryError(MarbleError):
    """The model registry cannot be reached or refused the request."""


class TrainingError(MarbleError):
    """Training cannot continue (e.g. too many consecutive non-finite steps)."""
