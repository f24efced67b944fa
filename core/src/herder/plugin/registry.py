"""The one place that talks to pluggy: loads plugins and answers "what is installed?".

Registries map a name to a dotted path (``package.module:Class``); the class is imported only
when that name is chosen, so an operator using the ``aws`` driver never imports the Azure SDK,
and a plugin whose module is broken fails only for the people who choose it.

Plugins are found in three places, in this order: herder's own :mod:`herder.plugin.builtin`, the
modules named by entry points of the ``herder`` group (installed distributions), and objects
handed to :meth:`Plugins.load` directly (tests, embedding applications).  Each plugin's
registration hooks are called on their own, so that every registered name remembers which
plugin registered it.

Plugins fail alone.  A plugin whose module cannot be imported, whose hooks are misspelled or
whose registration hook raises is left out as a whole and recorded as a :class:`PluginFailure`;
the others load.  ``herder plugins`` and the log at start-up name each failure, and choosing a
name that is missing says which plugins failed and why.  A name claimed by two plugins is
usable from neither (choosing it is an error that names both), because silently letting one
win would make the behaviour depend on installation order; herder's own built-in names always
stay herder's, so an installed package can never take ``loopback`` or ``sim`` away.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from herder.plugin import hookspecs

if TYPE_CHECKING:
    from herder.config import ConfigProblem

#: Every kind of registration, and the hook that collects it.
KINDS: dict[str, str] = {
    "driver": "herder_register_drivers",
    "executor": "herder_register_executors",
    "boot_probe": "herder_register_boot_probes",
    "dispatcher": "herder_register_dispatchers",
    "queue": "herder_register_queues",
}

_BUILTIN_NAME = "builtin"  # also the entry-point name herder's own distribution declares


class PluginError(Exception):
    """A plugin name is unknown, or its class cannot be loaded, or plugins disagree."""


@dataclass(frozen=True)
class Registration:
    """One name registered by one plugin."""

    kind: str  # "driver", "executor", "boot_probe", "dispatcher", "queue"
    name: str
    target: str  # dotted path "pkg.module:Class"
    plugin: str  # name of the registering plugin
    description: str = ""
    obj: Any = field(default=None, compare=False, repr=False)  # set when a class was given

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "target": self.target,
            "description": self.description,
        }


@dataclass
class Registry:
    """Collects the registrations of one kind; ``plugin`` is the plugin being asked now."""

    kind: str
    plugin: str = ""
    items: dict[str, Registration] = field(default_factory=dict)
    #: Names two plugins claimed, with the message that names both: usable from neither.
    conflicts: dict[str, str] = field(default_factory=dict)
    #: Claims on built-in names, refused (the built-in stays), each with its message.
    refused: list[str] = field(default_factory=list)

    def add(self, name: str, target: str | type, description: str = "") -> None:
        """Register ``name``; ``target`` is ``"pkg.module:Class"`` (preferred) or the class.

        A dotted path keeps the import lazy.  Passing the class itself is fine for plugins
        whose module is cheap to import anyway.
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise PluginError(
                f"plugin {self.plugin!r} registered an invalid {self.kind} name {name!r}"
            )
        obj: Any = None
        if isinstance(target, type):
            obj = target
            target = f"{target.__module__}:{target.__qualname__}"
        elif not isinstance(target, str) or ":" not in target:
            raise PluginError(
                f"plugin {self.plugin!r} registered {self.kind} {name!r} with target "
                f"{target!r}: expected 'package.module:Class'"
            )
        existing = self.items.get(name)
        if existing is not None and existing.target != target:
            raise PluginError(
                f"plugin {self.plugin!r} registered {_label(self.kind)} {name!r} twice, "
                f"as {existing.target} and as {target}"
            )
        self.items[name] = Registration(self.kind, name, target, self.plugin, description, obj)

    def merge(self, other: Registry) -> None:
        """Take ``other``'s registrations (one plugin's); a name two plugins claim is a conflict.

        A conflict with a built-in name leaves the built-in in place; any other conflict takes
        the name away from both, so that neither install order nor plugin names decide.
        """
        for name, reg in other.items.items():
            if name in self.conflicts:
                self.conflicts[name] += f" and by plugin {reg.plugin!r} ({reg.target})"
                continue
            existing = self.items.get(name)
            if existing is None:
                self.items[name] = reg
                continue
            message = (
                f"{_label(self.kind)} {name!r} is registered twice: by plugin "
                f"{existing.plugin!r} ({existing.target}) and by plugin {reg.plugin!r} "
                f"({reg.target}); uninstall one of them"
            )
            if existing.plugin == _BUILTIN_NAME:
                self.refused.append(message.replace("uninstall one of them", "the built-in stays"))
                continue
            del self.items[name]
            self.conflicts[name] = message


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was left out, and why: shown by ``herder plugins`` and logged at start."""

    plugin: str
    distribution: str
    version: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "error": self.error,
        }

    def describe(self) -> str:
        """``plugin 'x' (from dist 1.0): <why>``."""
        origin = " ".join(part for part in (self.distribution, self.version) if part)
        return f"plugin {self.plugin!r}{f' (from {origin})' if origin else ''}: {self.error}"


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin, as ``herder plugins`` shows it."""

    name: str
    distribution: str
    version: str
    registrations: tuple[Registration, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "registrations": [r.to_json() for r in self.registrations],
        }


def load_target(target: str) -> Any:
    """Import ``package.module:attr`` (``attr`` may be dotted, for nested classes)."""
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"cannot load {target}: {exc}") from exc
    return obj


#: How messages name a kind whose key alone would be unclear.
_LABELS = {"queue": "queue backend"}


def _label(kind: str) -> str:
    return _LABELS.get(kind, kind.replace("_", " "))


def _plural(kind: str) -> str:
    return _label(kind) + "s"


class Plugins:
    """The installed plugins and what they registered.  Build one with :meth:`load`."""

    def __init__(
        self,
        manager: pluggy.PluginManager,
        registries: dict[str, Registry],
        infos: list[PluginInfo],
        failures: Sequence[PluginFailure] = (),
    ) -> None:
        self._manager = manager
        self._registries = registries
        self._infos = infos
        self._failures = list(failures)

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(cls, entry_points: bool = True, extra: Sequence[object] = ()) -> Plugins:
        """Find every plugin and collect its registrations; a broken plugin is left out.

        ``entry_points=False`` skips installed distributions (tests want only the built-ins and
        their own ``extra`` plugins, whatever else happens to be installed).  What was left out
        is in :meth:`failures`; only a broken built-in (herder itself) raises
        :class:`PluginError`.
        """
        manager = pluggy.PluginManager(hookspecs.PROJECT)
        manager.add_hookspecs(hookspecs)
        origins: dict[str, tuple[str, str]] = {}
        failures: list[PluginFailure] = []

        from herder.plugin import builtin

        _register(manager, builtin, _BUILTIN_NAME)
        origins[_BUILTIN_NAME] = ("herder", _herder_version())
        if entry_points:
            for ep in _entry_points():
                dist = ep.dist
                origin = (dist.name, dist.version) if dist is not None else ("", "")
                try:
                    name = _register_entry_point(manager, ep)
                except PluginError as exc:
                    failures.append(PluginFailure(ep.name, *origin, str(exc)))
                    continue
                if name is not None:
                    origins[name] = origin
        for obj in extra:
            name = _unique_name(manager, _object_name(obj))
            try:
                origins[_register(manager, obj, name)] = ("", "")
            except PluginError as exc:
                failures.append(PluginFailure(name, "", "", str(exc)))
        for name, error in _drop_invalid(manager):
            failures.append(PluginFailure(name, *origins.pop(name, ("", "")), error))
        registries, failed = _collect(manager)
        for name, error in failed:
            failures.append(PluginFailure(name, *origins.pop(name, ("", "")), error))
        infos = [
            PluginInfo(
                name=name,
                distribution=origins.get(name, ("", ""))[0],
                version=origins.get(name, ("", ""))[1],
                registrations=tuple(
                    r for reg in registries.values() for r in reg.items.values() if r.plugin == name
                ),
            )
            for name, _plugin in manager.list_name_plugin()
        ]
        return cls(manager, registries, infos, failures)

    # ----------------------------------------------------------------- queries

    def names(self, kind: str) -> list[str]:
        """Registered names of one kind, sorted."""
        return sorted(self._registry(kind).items)

    def registration(self, kind: str, name: str) -> Registration:
        """The registration of ``name``, or :class:`PluginError` listing the installed ones."""
        registry = self._registry(kind)
        if name in registry.items:
            return registry.items[name]
        if name in registry.conflicts:
            raise PluginError(registry.conflicts[name])
        raise PluginError(self.unknown_name_message(kind, name))

    def unknown_name_message(self, kind: str, name: str) -> str:
        """``unknown driver 'x'; installed drivers: a, b (did you mean 'a'?)``.

        When plugins failed to load, the message says so: the name may be one of theirs.  A
        failed plugin whose entry point has the chosen name is named first, as the likely one.
        """
        names = self.names(kind)
        if not names:
            message = f"unknown {_label(kind)} {name!r}; no {_plural(kind)} are installed"
        else:
            message = (
                f"unknown {_label(kind)} {name!r}; installed {_plural(kind)}: {', '.join(names)}"
            )
            close = difflib.get_close_matches(name, names, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        failures = sorted(self._failures, key=lambda f: f.plugin != name)
        if failures:
            message += "; these plugins failed to load: " + "; ".join(
                f.describe() for f in failures
            )
        return message

    def driver_class(self, name: str) -> type[Any]:
        """The :class:`herder.cloud.Driver` subclass registered as ``name``."""
        from herder.plugin.cloud import Driver

        return self._load_class("driver", name, Driver, "herder.cloud.Driver")

    def executor_class(self, name: str) -> type[Any]:
        """The :class:`herder.executor.Executor` subclass registered as ``name``."""
        from herder.plugin.executor import Executor

        return self._load_class("executor", name, Executor, "herder.executor.Executor")

    def boot_probe_class(self, name: str) -> type[Any]:
        """The :class:`herder.plugin.bootprobe.BootProbe` subclass registered as ``name``."""
        from herder.plugin.bootprobe import BootProbe

        return self._load_class("boot_probe", name, BootProbe, "herder.plugin.bootprobe.BootProbe")

    def dispatcher_class(self, name: str) -> type[Any]:
        """The :class:`herder.dispatch.DispatchBackend` subclass registered as ``name``."""
        from herder.dispatch.backend import DispatchBackend

        return self._load_class(
            "dispatcher", name, DispatchBackend, "herder.dispatch.DispatchBackend"
        )

    def queue_class(self, name: str) -> type[Any]:
        """The :class:`herder.queue.backend.QueueBackend` subclass registered as ``name``."""
        from herder.queue.backend import QueueBackend

        return self._load_class("queue", name, QueueBackend, "herder.queue.backend.QueueBackend")

    def config_problems(self, data: dict[str, Any]) -> list[ConfigProblem]:
        """Every problem these plugins find in a parsed configuration (names not installed,
        parameters a plugin's model refuses); what :func:`herder.config.load_config` asks."""
        from herder.plugin.config_checks import plugin_problems

        return plugin_problems(data, self)

    def describe(self) -> list[PluginInfo]:
        """Every installed plugin with what it registers, in load order."""
        return list(self._infos)

    def failures(self) -> list[PluginFailure]:
        """The plugins left out, and the names two plugins claimed, each with why."""
        conflicts = [
            PluginFailure(f"{_label(kind)} {name!r}", "", "", message)
            for kind in KINDS
            for name, message in sorted(self._registries[kind].conflicts.items())
        ]
        refused = [
            PluginFailure(_label(kind), "", "", message)
            for kind in KINDS
            for message in self._registries[kind].refused
        ]
        return [*self._failures, *conflicts, *refused]

    def registrations(self) -> list[Registration]:
        """Every registration, by kind then name."""
        return [self._registries[kind].items[name] for kind in KINDS for name in self.names(kind)]

    # ----------------------------------------------------------------- helpers

    def _registry(self, kind: str) -> Registry:
        if kind not in self._registries:
            raise ValueError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
        return self._registries[kind]

    def _load_class(self, kind: str, name: str, base: type, base_name: str) -> type[Any]:
        """Import the registered class now (not at load time) and check what it is; a wrong one
        is named against ``base_name``, the name plugin authors import the base class by."""
        reg = self.registration(kind, name)
        obj = reg.obj if reg.obj is not None else _load_for(reg)
        if not isinstance(obj, type):
            raise PluginError(
                f"{_label(kind)} {name!r} ({reg.target}, from plugin {reg.plugin!r}) is not a class"
            )
        if not issubclass(obj, base):
            raise PluginError(
                f"{_label(kind)} {name!r} ({reg.target}, from plugin {reg.plugin!r}) is not a "
                f"subclass of {base_name}"
            )
        return obj


def _load_for(reg: Registration) -> Any:
    try:
        return load_target(reg.target)
    except PluginError as exc:
        raise PluginError(
            f"{_label(reg.kind)} {reg.name!r} from plugin {reg.plugin!r}: {exc}"
        ) from exc


def _herder_version() -> str:
    from herder import __version__

    return __version__


def _entry_points() -> list[metadata.EntryPoint]:
    """The ``herder`` entry points, sorted so that load order never depends on sys.path."""
    return sorted(metadata.entry_points(group=hookspecs.PROJECT), key=lambda ep: ep.name)


def _register_entry_point(manager: pluggy.PluginManager, ep: metadata.EntryPoint) -> str | None:
    """Load one entry point's module and register it; None if it is already registered."""
    try:
        obj = ep.load()
    except Exception as exc:
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        raise PluginError(
            f"cannot load plugin {ep.name!r} ({ep.value}, from {dist}): {exc}"
        ) from exc
    if manager.is_registered(obj):
        return None  # e.g. herder.plugin.builtin, registered first on purpose
    if manager.has_plugin(ep.name):
        other = manager.get_plugin(ep.name)
        raise PluginError(
            f"two plugins are named {ep.name!r}: {_object_name(other)} and {ep.value}"
        )
    return _register(manager, obj, ep.name)


def _register(manager: pluggy.PluginManager, obj: object, name: str) -> str:
    if manager.is_registered(obj):
        raise PluginError(f"plugin {name!r} is registered twice")
    try:
        registered = manager.register(obj, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginError(f"cannot register plugin {name!r}: {exc}") from exc
    if registered is None:  # blocked by name
        raise PluginError(f"plugin {name!r} is blocked")
    return registered


def _object_name(obj: object) -> str:
    if isinstance(obj, ModuleType):
        return obj.__name__
    name = getattr(obj, "__name__", None) or type(obj).__name__
    return f"{getattr(obj, '__module__', '')}.{name}".lstrip(".")


def _unique_name(manager: pluggy.PluginManager, name: str) -> str:
    """``name``, or ``name#2``, ``name#3``... when another plugin already has it."""
    candidate, n = name, 1
    while manager.has_plugin(candidate):
        n += 1
        candidate = f"{name}#{n}"
    return candidate


def _drop_invalid(manager: pluggy.PluginManager) -> list[tuple[str, str]]:
    """Unregister each plugin whose hooks pluggy cannot match (a misspelled hook name)."""
    dropped: list[tuple[str, str]] = []
    while True:
        try:
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            name = manager.get_name(exc.plugin) or _object_name(exc.plugin)
            if name == _BUILTIN_NAME:
                raise PluginError(f"herder's built-in plugin is broken: {exc}") from exc
            manager.unregister(exc.plugin)
            dropped.append((name, f"invalid hook: {exc}"))
        else:
            return dropped


def _collect(
    manager: pluggy.PluginManager,
) -> tuple[dict[str, Registry], list[tuple[str, str]]]:
    """Call each plugin's registration hooks on their own, so registrations know their plugin.

    A plugin whose hook raises is unregistered, and none of its registrations are kept (a
    plugin half registered would be harder to reason about than one missing); it is returned
    with its error.
    """
    registries = {kind: Registry(kind) for kind in KINDS}
    failed: list[tuple[str, str]] = []
    for name, plugin in manager.list_name_plugin():
        others: Iterable[object] = [p for p in manager.get_plugins() if p is not plugin]
        own = {kind: Registry(kind, plugin=name) for kind in KINDS}
        try:
            for kind, hook_name in KINDS.items():
                caller = manager.subset_hook_caller(hook_name, remove_plugins=others)
                try:
                    caller(registry=own[kind])
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"plugin {name!r} failed in {hook_name}: {exc}") from exc
        except PluginError as exc:
            if name == _BUILTIN_NAME:
                raise
            manager.unregister(plugin)
            failed.append((name, str(exc)))
            continue
        for kind in KINDS:
            registries[kind].merge(own[kind])
    return registries, failed
