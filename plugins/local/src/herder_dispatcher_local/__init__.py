"""herder's ``local`` dispatcher: containers run on the dispatcher's own host."""

from herder_dispatcher_local.backend import LocalBackend, LocalParameters

__all__ = ["LocalBackend", "LocalParameters"]
