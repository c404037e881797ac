"""The plugin registry over the ``vlm.encoders``, ``vlm.adapters``, ``vlm.archs`` and
``vlm.datasets`` groups.

Listing reads entry-point metadata only (no plugin code is imported).  A
plugin's config class is imported on first use; one that fails to import is
recorded as *broken* with its distribution, version and error, and the rest
keep working (``strict=True`` raises instead).  Two distributions claiming one
name make that name an error naming both.  Tests and notebooks may register a
class in-process with :meth:`PluginRegistry.register`.

Each entry also carries the range of ``vlm-config`` its distribution declares (read from
the distribution's ``Requires-Dist`` metadata, never by importing it).  A plugin whose
range excludes the installed ``vlm-config`` is *incompatible*: it is listed with what it
needs, not imported, and the other plugins keep working.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import threading
from dataclasses import dataclass, field
from typing import Literal

from packaging.markers import UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from vlm_config.__about__ import __version__ as CORE_VERSION
from vlm_config.components import AdapterConfig, ArchConfig, ComponentConfig, EncoderConfig
from vlm_config.data import DatasetConfig

GroupName = Literal["vlm.encoders", "vlm.adapters", "vlm.archs", "vlm.datasets"]

GROUP_BASES: dict[str, type[ComponentConfig]] = {
    "vlm.encoders": EncoderConfig,
    "vlm.adapters": AdapterConfig,
    "vlm.archs": ArchConfig,
    "vlm.datasets": DatasetConfig,
}
SHORT_GROUPS = {
    "encoders": "vlm.encoders",
    "adapters": "vlm.adapters",
    "archs": "vlm.archs",
    "datasets": "vlm.datasets",
}
IN_PROCESS = "<in-process>"
CORE_DISTRIBUTION = "vlm-config"


class PluginError(LookupError):
    """A plugin name that cannot be used: unknown, broken, duplicated or malformed."""


@dataclass
class PluginEntry:
    """One plugin name in one group, as far as metadata (and loading, once tried) tells."""

    group: str
    name: str
    target: str
    distribution: str
    version: str
    loaded: type[ComponentConfig] | None = None
    error: str | None = None
    duplicates: list[str] = field(default_factory=list)
    core_range: str = ""
    """The ``vlm-config`` specifier the distribution declares (``>=0.1,<0.2``); empty when
    it declares none (or for in-process registrations)."""
    incompatible: str | None = None
    """Why the installed ``vlm-config`` is outside :attr:`core_range`, if it is."""

    @property
    def status(self) -> str:
        if self.duplicates:
            return "duplicate"
        if self.incompatible is not None:
            return f"incompatible: {self.incompatible}"
        if self.error is not None:
            return "broken"
        return "loaded" if self.loaded is not None else "not loaded"

    @property
    def origin(self) -> str:
        return f"{self.distribution} {self.version}".strip()


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown>", ""
    return dist.metadata["Name"] or "<unknown>", dist.version or ""


def core_requirement(requires: list[str] | None) -> tuple[str, str | None]:
    """``(range, problem)`` for a distribution's ``Requires-Dist`` lines.

    ``range`` is the specifier it puts on ``vlm-config`` (``""`` if none, ``"any"`` if
    unversioned); ``problem`` says why the installed ``vlm-config`` is outside it (``None``
    when inside, or when the metadata cannot be read: that is not this check's business).
    Requirements that apply only to an extra are ignored."""
    core = canonicalize_name(CORE_DISTRIBUTION)
    for line in requires or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != core:
            continue
        try:
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
        except (UndefinedComparison, UndefinedEnvironmentName):
            continue
        # lower bounds first, as people write ranges (the metadata sorts them by text)
        ordered = sorted(req.specifier, key=lambda sp: (sp.operator.startswith("<"), str(sp)))
        spec = ",".join(str(sp) for sp in ordered)
        if not spec:
            return "any", None
        try:
            installed = Version(CORE_VERSION)
        except InvalidVersion:
            return spec, None
        if req.specifier.contains(installed, prereleases=True):
            return spec, None
        return spec, f"needs {CORE_DISTRIBUTION}{spec}, installed {CORE_VERSION}"
    return "", None


def _core_of(ep: md.EntryPoint) -> tuple[str, str | None]:
    dist = getattr(ep, "dist", None)
    return core_requirement(dist.requires if dist is not None else None)


class PluginRegistry:
    """Entry-point backed registry; see the module docstring for the behaviour.

    Args:
        strict: raise on a broken plugin instead of recording it and skipping it.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self._lock = threading.RLock()
        self._entries: dict[str, dict[str, PluginEntry]] | None = None
        self._in_process: dict[str, dict[str, type[ComponentConfig]]] = {g: {} for g in GROUP_BASES}
        self.generation = 0

    # ----------------------------------------------------------------- discovery
    def refresh(self) -> None:
        """Forget what was discovered and loaded (call after installing plugins)."""
        with self._lock:
            self._entries = None
            importlib.invalidate_caches()
            self.generation += 1

    def _discover(self) -> dict[str, dict[str, PluginEntry]]:
        with self._lock:
            if self._entries is not None:
                return self._entries
            entries: dict[str, dict[str, PluginEntry]] = {g: {} for g in GROUP_BASES}
            for group in GROUP_BASES:
                seen: set[tuple[str, str, str]] = set()
                for ep in md.entry_points(group=group):
                    dist, version = _dist_of(ep)
                    key = (ep.name, dist, ep.value)
                    if key in seen:  # the same distribution seen twice on sys.path
                        continue
                    seen.add(key)
                    entry = PluginEntry(group, ep.name, ep.value, dist, version)
                    entry.core_range, entry.incompatible = _core_of(ep)
                    current = entries[group].get(ep.name)
                    if current is None:
                        entries[group][ep.name] = entry
                    elif current.distribution != dist:
                        current.duplicates.append(entry.origin)
                for name, cls in self._in_process[group].items():
                    target = f"{cls.__module__}:{cls.__qualname__}"
                    entries[group][name] = PluginEntry(
                        group, name, target, IN_PROCESS, "", loaded=cls
                    )
            self._entries = entries
            return entries

    @staticmethod
    def group_name(group: str) -> str:
        """Accept ``'adapters'`` or ``'vlm.adapters'``; reject anything else."""
        full = SHORT_GROUPS.get(group, group)
        if full not in GROUP_BASES:
            raise PluginError(
                f"unknown plugin group {group!r}; groups are {', '.join(GROUP_BASES)}"
            )
        return full

    def names(self, group: str) -> list[str]:
        """Every name in a group, from metadata only (broken and duplicated included)."""
        return sorted(self._discover()[self.group_name(group)])

    def entries(self, group: str | None = None) -> list[PluginEntry]:
        """Metadata rows for one group or all, sorted by group then name."""
        groups = [self.group_name(group)] if group else list(GROUP_BASES)
        found = self._discover()
        return [found[g][n] for g in groups for n in sorted(found[g])]

    # ------------------------------------------------------------------- loading
    def load(self, group: str, name: str) -> type[ComponentConfig]:
        """Import and check the config class registered as ``name``.

        Raises:
            PluginError: unknown name (lists the installed ones), duplicate name
                (names both distributions), broken plugin, a plugin whose distribution
                requires another ``vlm-config`` than the installed one, or a class that does not
                subclass the group's base or whose discriminator default differs from
                ``name``.
        """
        group = self.group_name(group)
        found = self._discover()[group]
        entry = found.get(name)
        if entry is None:
            installed = ", ".join(sorted(found)) or "none"
            raise PluginError(f"no {group} plugin named {name!r}; installed: {installed}")
        self._ensure_loaded(entry)
        if entry.duplicates:
            raise PluginError(
                f"{group} plugin name {name!r} is claimed by more than one distribution: "
                f"{entry.origin} and {', '.join(entry.duplicates)}; uninstall one of them"
            )
        if entry.incompatible is not None:
            raise PluginError(
                f"{group} plugin {name!r} from {entry.origin} is incompatible: it "
                f"{entry.incompatible}; install a release of {entry.distribution} made for "
                f"this {CORE_DISTRIBUTION}, or a {CORE_DISTRIBUTION} in its range"
            )
        if entry.loaded is None:
            raise PluginError(
                f"{group} plugin {name!r} from {entry.origin} is broken: {entry.error}"
            )
        return entry.loaded

    def _ensure_loaded(self, entry: PluginEntry) -> None:
        if entry.loaded is not None or entry.error is not None:
            return
        if entry.incompatible is not None:  # never import code built for another core
            if self.strict:
                raise PluginError(
                    f"{entry.group} plugin {entry.name!r} from {entry.origin} is "
                    f"incompatible: it {entry.incompatible}"
                )
            return
        try:
            obj = md.EntryPoint(entry.name, entry.target, entry.group).load()
            entry.loaded = self._check_class(entry.group, entry.name, obj)
        except Exception as exc:  # a plugin may raise anything on import
            entry.error = f"{type(exc).__name__}: {exc}"
            if self.strict:
                raise PluginError(
                    f"{entry.group} plugin {entry.name!r} from {entry.origin} failed to load: "
                    f"{entry.error}"
                ) from exc

    @staticmethod
    def _check_class(group: str, name: str, obj: object) -> type[ComponentConfig]:
        base = GROUP_BASES[group]
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(
                f"entry point {name!r} must name a subclass of {base.__name__}, got {obj!r}"
            )
        default = obj.plugin_name()
        if default != name:
            raise TypeError(
                f"{obj.__qualname__}.{obj.discriminator} defaults to {default!r} but its entry "
                f"point is named {name!r}; they must be equal"
            )
        return obj

    def load_all(self, group: str) -> dict[str, type[ComponentConfig]]:
        """Every usable class of a group (broken and duplicated names skipped unless strict)."""
        group = self.group_name(group)
        usable: dict[str, type[ComponentConfig]] = {}
        for entry in self.entries(group):
            self._ensure_loaded(entry)
            if entry.duplicates:
                if self.strict:
                    self.load(group, entry.name)
                continue
            if entry.loaded is not None:
                usable[entry.name] = entry.loaded
        return usable

    # ----------------------------------------------------------------- in-process
    def register(self, group: str, cls: type[ComponentConfig], *, replace: bool = False) -> None:
        """Register a config class under its discriminator default, for tests and notebooks.

        Raises:
            PluginError: the class is malformed, or the name is taken and ``replace`` is false.
        """
        group = self.group_name(group)
        try:
            name = cls.plugin_name() if isinstance(cls, type) else ""
            self._check_class(group, name, cls)
        except TypeError as exc:
            raise PluginError(str(exc)) from exc
        with self._lock:
            taken = self._discover()[group].get(name)
            if taken is not None and not replace:
                raise PluginError(
                    f"{group} name {name!r} is already provided by {taken.origin}; "
                    "pass replace=True to override it in this process"
                )
            self._in_process[group][name] = cls
            self._entries = None
            self.generation += 1

    def unregister(self, group: str, name: str) -> None:
        """Remove an in-process registration (entry-point plugins are untouched)."""
        group = self.group_name(group)
        with self._lock:
            self._in_process[group].pop(name, None)
            self._entries = None
            self.generation += 1


_default = PluginRegistry()


def get_registry() -> PluginRegistry:
    """The process-wide registry used by :class:`vlm_config.JobConfig`."""
    return _default
