"""Typed errors. Everything a caller can get wrong raises one of these, with a sentence."""

from __future__ import annotations


class ImageBindError(Exception):
    """Base class of this package's errors."""


class InvalidInput(ImageBindError, ValueError):
    """One input item cannot be turned into a model input.

    Carries the modality, a human-readable reason and, when known, the item's id, so a job can
    write it to its errors table and an endpoint can answer 400 naming the bad input.
    """

    def __init__(self, modality: str, reason: str, item_id: str | None = None) -> None:
        self.modality = str(modality)
        self.reason = reason
        self.item_id = item_id
        where = f" (item {item_id!r})" if item_id is not None else ""
        super().__init__(f"invalid {self.modality} input{where}: {reason}")

    def with_id(self, item_id: str | None) -> InvalidInput:
        """The same error, naming `item_id`."""
        return InvalidInput(self.modality, self.reason, item_id)

    def __reduce__(self):  # picklable across Ray workers
        return (InvalidInput, (self.modality, self.reason, self.item_id))


class CheckpointError(ImageBindError):
    """A checkpoint cannot be fetched, verified, read or mapped onto the model."""


class StoreUnavailable(ImageBindError):
    """An object store cannot be reached or has no credentials to sign with: the store's (or
    the operator's) fault, not the item's. An endpoint answers 503; a job retries or stops
    rather than recording the item as bad.

    Carries the store (endpoint URL, or the scheme when the default endpoint is used) and the
    reason.
    """

    def __init__(self, store: str, reason: str, uri: str | None = None) -> None:
        self.store = store
        self.reason = reason
        self.uri = uri
        super().__init__(f"object store {store} is unavailable: {reason}")

    def __reduce__(self):  # picklable across Ray workers
        return (StoreUnavailable, (self.store, self.reason, self.uri))


class WorkerBroken(ImageBindError):
    """This process can no longer load a module it needs: an earlier import in it was
    interrupted part way (`imagebind_core._lazy.load_module`). Not any input's fault, and not
    curable in the process: a job's worker exits so that Ray runs its task again on a fresh
    one; an endpoint replica fails its health check so that Serve replaces it."""

    def __init__(self, module: str, reason: str, cause: str) -> None:
        self.module = module
        self.reason = reason
        self.cause = cause
        super().__init__(
            f"this process cannot load {module} ({reason}) since {cause}; it must be restarted"
        )

    def __reduce__(self):  # picklable across Ray workers
        return (WorkerBroken, (self.module, self.reason, self.cause))
