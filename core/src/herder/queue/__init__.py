"""The durable container queue: the interface and its backends."""

from herder.queue.base import (
    ContainerNotFound,
    ContainerQueue,
    InvalidTransition,
    QueueEntry,
    QueueError,
    QueueUnavailable,
    Sizer,
)

__all__ = [
    "ContainerNotFound",
    "ContainerQueue",
    "InvalidTransition",
    "QueueEntry",
    "QueueError",
    "QueueUnavailable",
    "Sizer",
]
