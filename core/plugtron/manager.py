"""The plugin manager: one instance owns the plugins and everything they register.

Nothing here imports torch or megatron. Plugins come from entry points of the
``plugtron`` group and from :meth:`PlugtronPluginManager.register` (tests,
notebooks, ``plugtron -p module``).
"""

from __future__ import annotations

import difflib
import importlib
import os
import traceback
import warnings
from typing import Any, Mapping

import attrs
import pluggy

from plugtron import _discovery, _registry, hookspecs
from plugtron._markers import PROJECT_NAME
from plugtron.errors import PluginError, PlugtronError, UnknownFamilyError
from plugtron.facade import Hooks
from plugtron.records import ConverterInfo, FamilyInfo, LayerSpecInfo

CHAINED_HOOKS = ("plugtron_pre_wrap", "plugtron_post_wrap")
_SPEC_NAMES = frozenset(n for n in dir(hookspecs) if n.startswith("plugtron_"))


class PluginLoadWarning(UserWarning):
    """A plugin failed to load and was skipped (set PLUGTRON_STRICT=1 to fail instead)."""


class PluginSelectionWarning(PluginLoadWarning):
    """``PLUGTRON_PLUGINS`` / ``PLUGTRON_DISABLE_PLUGINS`` names no installed plugin (a typo, usually)."""


@attrs.define
class PluginRecord:
    """What ``plugtron plugins`` shows for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    source: str  # "entry point", "in-process" or "builtin"
    status: str = "loaded"  # loaded | failed | disabled by ... | not selected by ...
    error: str | None = None
    hooks: list[str] = attrs.field(factory=list)


class _Pluggy(pluggy.PluginManager):
    """Treat undecorated ``plugtron_*`` functions that match a spec as implementations."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name in _SPEC_NAMES and callable(getattr(plugin, name, None)):
            return {}
        return opts


class PlugtronPluginManager:
    """Loads plugins, keeps their registries, and exposes typed hook calls.

    ``env`` defaults to ``os.environ``; pass a dict in tests to control
    ``PLUGTRON_PLUGINS`` / ``PLUGTRON_DISABLE_PLUGINS`` / ``PLUGTRON_STRICT``.
    """

    def __init__(self, *, load_entrypoints: bool = True, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if env is None else env)
        self.strict = _discovery.strict_from_env(self._env)
        self.selection = _discovery.Selection.from_env(self._env)
        self.pm = _Pluggy(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        #: Problems that skipped nothing but deserve a word (``plugtron plugins`` shows them).
        self.warnings: list[str] = []
        self._tables: _registry.Registries | None = None
        self.hooks = Hooks(self.pm)
        from plugtron import _builtin

        self._register(_builtin, "plugtron", PluginRecord("plugtron", "plugtron", _version("plugtron"), "builtin"))
        if load_entrypoints:
            self.load_entrypoints()

    # -- loading -----------------------------------------------------------
    def load_entrypoints(self) -> None:
        candidates = _discovery.find_candidates()
        self._check_selection(candidates)
        for cand in candidates:
            if cand.name in self.records:
                continue
            record = PluginRecord(cand.name, cand.distribution, cand.version, "entry point")
            verdict = self.selection.verdict(cand.name, cand.distribution)
            if verdict is not None:
                record.status = verdict
                self.records[cand.name] = record
                continue
            try:
                plugin = cand.entry_point.load()
            except BaseException as exc:  # noqa: BLE001 - SystemExit from a plugin must not exit us
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._failed(record, exc)
                continue
            self._register_guarded(plugin, cand.name, record)

    def _check_selection(self, candidates: list[_discovery.Candidate]) -> None:
        """A misspelled name in PLUGTRON_PLUGINS would silently select nothing: say so (strict: fail)."""
        for message in self.selection.unknown_names(candidates):
            if message in self.warnings:
                continue
            self.warnings.append(message)
            if self.strict:
                raise PluginError(message)
            warnings.warn(message, PluginSelectionWarning, stacklevel=4)

    def register(self, plugin: Any, name: str | None = None, *, distribution: str | None = None) -> None:
        """Register a plugin object or module in-process; errors are raised, not skipped."""
        if isinstance(plugin, str):
            plugin = importlib.import_module(plugin)
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self._register(plugin, name, PluginRecord(name, distribution, None, "in-process"))

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.records.pop(name, None)
        self._tables = None

    def _register_guarded(self, plugin: Any, name: str, record: PluginRecord) -> None:
        try:
            self._register(plugin, name, record)
        except PluginError as exc:
            self._failed(record, exc)

    def _register(self, plugin: Any, name: str, record: PluginRecord) -> None:
        _check_names(plugin, name, record.distribution)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.pm.get_plugin(name) is plugin:  # only undo what this call registered
                self.pm.unregister(name=name)
            raise PluginError(f"plugin '{name}' ({record.distribution or 'in-process'}): {exc}") from exc
        _check_chained(self.pm, name)
        record.hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
        self.records[name] = record
        self._tables = None

    def _failed(self, record: PluginRecord, exc: BaseException) -> None:
        record.status = "failed"
        if isinstance(exc, PlugtronError):  # our own message already says what and who
            record.error = str(exc)
        else:
            record.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.records[record.name] = record
        message = f"plugtron plugin '{record.name}' from {record.distribution} {record.version} failed to load: {record.error}"
        if self.strict:
            raise PluginError(message) from exc
        warnings.warn(message + " (skipped; PLUGTRON_STRICT=1 makes this an error)", PluginLoadWarning, stacklevel=3)

    def _drop(self, plugin_name: str, exc: BaseException) -> None:
        record = self.records.get(plugin_name) or PluginRecord(plugin_name, None, None, "in-process")
        if record.source == "in-process" or self.strict:
            record.status, record.error = "failed", repr(exc)
            raise PluginError(
                f"plugtron plugin '{plugin_name}' from {record.distribution or 'in-process'} "
                f"failed while registering: {exc!r}"
            ) from exc
        self.pm.unregister(name=plugin_name)
        self._failed(record, exc)

    # -- registries --------------------------------------------------------
    def _describe(self, plugin_name: str) -> tuple[str | None, str]:
        record = self.records.get(plugin_name)
        return (record.distribution if record else None, plugin_name)

    @property
    def tables(self) -> _registry.Registries:
        if self._tables is None:
            relay = self.pm.hook
            collect = lambda caller, kind: _registry.collect(caller, kind, self._describe, self._drop)  # noqa: E731
            families = collect(relay.plugtron_register_families, FamilyInfo)
            specs = collect(relay.plugtron_register_layer_specs, LayerSpecInfo)
            converters = collect(relay.plugtron_register_converters, ConverterInfo)
            # A plugin dropped by a later hook loses what earlier hooks registered for it.
            failed = {name for name, record in self.records.items() if record.status == "failed"}
            keep = lambda records: [r for r in records if r.plugin not in failed]  # noqa: E731
            self._tables = _registry.build_registries(keep(families), keep(specs), keep(converters))
        return self._tables

    def family(self, name: str) -> FamilyInfo:
        try:
            return self.tables.families[name]
        except KeyError:
            raise UnknownFamilyError(self._unknown_family(name)) from None

    def _unknown_family(self, name: str) -> str:
        """Why ``name`` is missing: a plugin the environment left out, one that failed, or none installed."""
        known = ", ".join(sorted(self.tables.families)) or "none"
        record = self._likely_provider(name)
        why = _why_not_loaded(record) if record else None
        if record and why:
            return (f"model family '{name}' is provided by plugin '{record.name}' ({record.distribution}), "
                    f"{why}; loaded families: {known}")
        return (f"no plugin provides model family '{name}' (installed families: {known}); "
                f"install its plugin, e.g. pip install plugtron-{name}")

    def _likely_provider(self, family: str) -> PluginRecord | None:
        """An unloaded plugin is never imported, so its families are unknown: match by name,
        the convention every plugtron family follows (entry point ``gpt``, distribution ``plugtron-gpt``)."""
        for record in self.records.values():
            if family in (record.name, record.distribution) or record.distribution == f"plugtron-{family}":
                return record
        return None

    def layer_specs(self, family: str) -> list[LayerSpecInfo]:
        specs = [s for (fam, _), s in self.tables.layer_specs.items() if fam == family]
        return sorted(specs, key=lambda s: -s.priority)

    def converter(self, source_format: str, architecture: str) -> ConverterInfo:
        try:
            return self.tables.converters[(source_format, architecture)]
        except KeyError:
            known = sorted(a for f, a in self.tables.converters if f == source_format)
            raise PlugtronError(
                f"no converter for {source_format} architecture '{architecture}' "
                f"(known: {', '.join(known) or 'none'})"
            ) from None


def _check_names(plugin: Any, name: str, distribution: str | None) -> None:
    """A ``plugtron_*`` attribute that matches no spec is a misspelled hook: pluggy would ignore it
    silently, and the plugin would seem to do nothing."""
    for attr in dir(plugin):
        if attr.startswith("plugtron_") and attr not in _SPEC_NAMES and callable(getattr(plugin, attr, None)):
            hint = _closest_hook(attr)
            raise PluginError(
                f"plugin '{name}' ({distribution or 'in-process'}) defines '{attr}', which matches no "
                f"plugtron hook; {hint}"
            )


def _closest_hook(attr: str) -> str:
    """Compared without the shared ``plugtron_`` prefix, which would make every name look close."""
    stems = {name.removeprefix("plugtron_"): name for name in _SPEC_NAMES}
    close = difflib.get_close_matches(attr.removeprefix("plugtron_"), sorted(stems), n=1)
    return f"did you mean '{stems[close[0]]}'?" if close else f"known hooks: {', '.join(sorted(_SPEC_NAMES))}"


def _why_not_loaded(record: PluginRecord) -> str | None:
    if record.status == "failed":
        return f"which failed to load: {record.error}"
    return _discovery.left_out_because(record.status)


def _check_chained(pm: pluggy.PluginManager, name: str) -> None:
    for hook_name in CHAINED_HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == name and (impl.hookwrapper or impl.wrapper):
                pm.unregister(name=name)
                raise PluginError(f"plugin '{name}': {hook_name} is chained and cannot be a wrapper")


def _version(distribution: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return None


_DEFAULT: PlugtronPluginManager | None = None


def get_plugin_manager() -> PlugtronPluginManager:
    """The process-wide manager used by the command line (created on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PlugtronPluginManager()
    return _DEFAULT
