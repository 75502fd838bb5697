"""The renderer: one task per template, re-rendering when its secrets change.

A render reads the template's secrets from a :class:`SecretSource` (the
agent's cache, or the store directly for ``render --once``), renders them,
and writes only if the output differs. A failed render keeps the last good
file, is logged naming the template and the reason (never a value), and is
retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import watchfiles

from agent.aio import wait_event
from agent.config import RenderConfig, TemplateConfig
from agent.errors import AgentError, ConfigError
from agent.metrics import Metrics
from agent.refresh import Backoff
from agent.render import writer
from agent.render.formats import RenderError, render
from agent.render.notify import Notifier
from agent.types import Secret, utcnow

if TYPE_CHECKING:
    from agent.audit import Auditor

log = logging.getLogger(__name__)


class SecretSource(Protocol):
    """Where a renderer reads secrets from."""

    async def get(
        self, name: str, *, stage: str | None = None, version: str | None = None
    ) -> Secret:
        """The secret at ``stage`` (default CURRENT) or ``version``; raises AgentError."""
        ...


@dataclass(eq=False)
class _Template:
    index: int
    cfg: TemplateConfig
    notifier: Notifier
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    renders: int = 0
    last_render: str | None = None
    error: str | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: The renderer's pass number when this template's last finished attempt began.
    attempted: int = -1

    @property
    def label(self) -> str:
        """The ``template`` label of the render metrics: bounded by the config."""
        return self.cfg.name or str(self.index)

    @property
    def where(self) -> str:
        return f"templates[{self.index}] ({self.cfg.destination})"

    def uses(self, name: str) -> bool:
        return any(sel.name == name for sel in self.cfg.selectors)


class Renderer:
    """Renders every configured template and keeps the files current."""

    #: Backoff between retries of a failed render (seconds); a secret change retries at once.
    retry_initial = 1.0
    retry_max = 60.0

    def __init__(
        self,
        templates: Sequence[TemplateConfig],
        source: SecretSource,
        *,
        render_config: RenderConfig,
        metrics: Metrics,
        child_pid: Callable[[], int | None] | None = None,
        audit: Auditor | None = None,
    ) -> None:
        self.source = source
        self.render_config = render_config
        self.metrics = metrics
        self.child_pid = child_pid
        self.audit = audit
        self._templates = [self._new(i, cfg) for i, cfg in enumerate(templates)]
        metrics.zero_template_errors([t.label for t in self._templates])
        self._group: asyncio.TaskGroup | None = None
        #: Set by :meth:`reconfigure` so :meth:`watch_template_files` watches the new set.
        self._reconfigured = asyncio.Event()
        #: Bumped by :meth:`settled`; set after every render attempt.
        self._pass = 0
        self._attempt_done = asyncio.Event()

    def _new(self, index: int, cfg: TemplateConfig) -> _Template:
        where = f"templates[{index}] ({cfg.destination})"
        notifier = Notifier(
            cfg.on_change, cfg.wait, where=where, metrics=self.metrics, child_pid=self.child_pid
        )
        return _Template(index, cfg, notifier)

    # ---------------------------------------------------------------- one pass

    async def probe(self) -> None:
        """Check every destination now: tmpfs, symlinks, allowed dirs, writable.

        Raises:
            ConfigError: naming ``templates[i]`` and the reason.
        """
        for t in self._templates:
            try:
                await asyncio.to_thread(self._probe_one, t.cfg)
            except RenderError as exc:
                raise ConfigError(exc.message, path=t.where) from None
            except OSError as exc:  # e.g. statfs or a directory scan refused
                raise ConfigError(str(exc), path=t.where) from None

    def _probe_one(self, cfg: TemplateConfig) -> None:
        dest, directory = cfg.destination, cfg.format == "files"
        self._check(cfg)
        owner = writer.resolve_owner(cfg.owner, cfg.group)
        removed = writer.remove_stale_temps(dest, directory=directory)
        if removed:
            log.info("removed %d leftovers of an interrupted write at %s", removed, dest)
        writer.probe(
            dest, owner=owner, directory=directory, shared_volumes=self.render_config.shared_volumes
        )

    def _check(self, cfg: TemplateConfig) -> None:
        writer.check_destination(
            cfg.destination,
            allow_disk=cfg.allow_disk,
            allowed_dirs=self.render_config.allowed_dirs,
            directory=cfg.format == "files",
            shared_volumes=self.render_config.shared_volumes,
        )

    async def render_one(self, t: _Template) -> bool:
        """Render ``t`` once; return whether a file changed. Raises AgentError or OSError."""
        cfg = t.cfg
        secrets = {}
        for sel in cfg.selectors:
            secrets[sel.name] = await self.source.get(
                sel.name, stage=sel.stage, version=sel.version
            )
        text = cfg.template
        if cfg.template_file is not None:
            text = await asyncio.to_thread(cfg.template_file.read_text, encoding="utf-8")
        output = render(cfg, secrets, template_text=text)
        changed = await asyncio.to_thread(self._write, cfg, output)
        t.renders += 1
        t.last_render = utcnow().isoformat()
        t.error = None
        self.metrics.renders.labels(t.label, "written" if changed else "unchanged").inc()
        if changed and self.audit is not None:
            for name, secret in secrets.items():
                self.audit.record(
                    "rendered",
                    secret=name,
                    version=secret.version_id,
                    outcome="written",
                    reason=str(cfg.destination),
                )
        return changed

    def _write(self, cfg: TemplateConfig, output: bytes | dict[str, bytes]) -> bool:
        self._check(cfg)
        owner = writer.resolve_owner(cfg.owner, cfg.group)
        shared = self.render_config.shared_volumes
        if isinstance(output, dict):
            return writer.write_files(
                cfg.destination, output, mode=cfg.mode, owner=owner, shared_volumes=shared
            )
        return writer.write_file(
            cfg.destination, output, mode=cfg.mode, owner=owner, shared_volumes=shared
        )

    def _failed(self, t: _Template, exc: Exception) -> str:
        if isinstance(exc, AgentError):
            reason = exc.message
        elif isinstance(exc, OSError):
            reason = str(exc)  # errno, strerror and file names: no values
        else:  # a bug or an odd value: the type only, as the message could quote a value
            reason = f"unexpected {type(exc).__name__}"
        message = f"{t.where}: {reason}"
        t.error = message
        self.metrics.renders.labels(t.label, "error").inc()
        return message

    async def render_all(self) -> list[str]:
        """Render every template once; return one message per failure (empty: all good)."""
        failures = []
        for t in self._templates:
            try:
                await self.render_one(t)
            except Exception as exc:  # one bad template must not stop the others
                failures.append(self._failed(t, exc))
        return failures

    # --------------------------------------------------------------- long-running

    def on_secret_changed(self, name: str) -> None:
        """Schedule a re-render of every template that uses ``name``."""
        for t in self._templates:
            if t.uses(name):
                t.dirty.set()

    async def run(self) -> None:
        """Render now and on every change, until cancelled."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            for t in self._templates:
                self._start(t)
            try:
                await asyncio.Event().wait()
            finally:
                self._group = None

    def _start(self, t: _Template) -> None:
        assert self._group is not None
        t.dirty.set()
        t.tasks = [
            self._group.create_task(self._loop(t)),
            self._group.create_task(t.notifier.run()),
        ]

    async def _loop(self, t: _Template) -> None:
        backoff = Backoff(initial=self.retry_initial, maximum=self.retry_max, jitter=0.1)
        while True:
            await t.dirty.wait()
            t.dirty.clear()
            began = self._pass
            try:
                changed = await self.render_one(t)
            except Exception as exc:  # never let one template end the renderer
                self._attempted(t, began)
                delay = backoff.next_delay()
                log.warning(
                    "render failed, keeping the last good file: %s; retry in %.1fs",
                    self._failed(t, exc),
                    delay,
                )
                # Retry after the delay, or at once when a secret changes (it may be the fix).
                await wait_event(t.dirty, delay)
                t.dirty.set()
                continue
            self._attempted(t, began)
            backoff.reset()
            if changed:
                log.info("%s rendered", t.where)
                t.notifier.changed()

    def _attempted(self, t: _Template, began: int) -> None:
        t.attempted = max(t.attempted, began)
        self._attempt_done.set()

    async def settled(self) -> None:
        """Return once every template has been rendered (or failed to) from now on.

        The agent is ready only after this: an app started by the readiness
        probe finds its files written from the secrets already loaded. A render
        that fails counts (as a secret that fails for good does): its error is
        in ``/v1/status`` and the renderer keeps retrying.
        """
        self._pass += 1
        target = self._pass
        for t in self._templates:
            t.dirty.set()
        while True:
            self._attempt_done.clear()
            if all(t.attempted >= target for t in self._templates):
                return
            await self._attempt_done.wait()

    def on_template_file_changed(self, path: Path) -> None:
        """Schedule a re-render of every template whose ``template_file`` is ``path``."""
        for t in self._templates:
            if t.cfg.template_file == path:
                t.dirty.set()

    async def watch_template_files(self) -> None:
        """Re-render a template when its ``template_file`` changes, as consul-template does.

        Watches the files' directories (editors replace a file rather than
        write it in place), like the config file; restarts on a reconfigure.
        """
        while True:
            self._reconfigured = reconfigured = asyncio.Event()
            names = frozenset(
                str(t.cfg.template_file) for t in self._templates if t.cfg.template_file
            )
            if not names:
                await reconfigured.wait()
                continue
            dirs = sorted({str(Path(name).parent) for name in names})

            def wanted(_change: object, changed: str, names: frozenset[str] = names) -> bool:
                return _normpath(changed) in names

            try:
                async for changes in watchfiles.awatch(
                    *dirs,
                    watch_filter=wanted,
                    recursive=False,
                    debounce=100,
                    step=50,
                    stop_event=reconfigured,
                ):
                    for _, changed in changes:
                        self.on_template_file_changed(Path(_normpath(changed)))
            except (OSError, RuntimeError) as exc:
                log.warning("not watching template files for changes: %s", exc)
                await reconfigured.wait()

    def reconfigure(self, templates: Sequence[TemplateConfig]) -> None:
        """Apply a reloaded ``templates:`` list: unchanged ones keep running."""
        # Matched by equality, not hashing: a config holding lists (``secrets: [a, b]``,
        # ``on_change.command``) is frozen but not hashable.
        old = list(self._templates)
        new_list = []
        for i, cfg in enumerate(templates):
            t = next((o for o in old if o.cfg == cfg), None)
            if t is not None:
                old.remove(t)
            else:
                t = self._new(i, cfg)
                if self._group is not None:
                    self._start(t)
            t.index = i
            t.notifier.where = t.where
            new_list.append(t)
        for t in old:
            for task in t.tasks:
                task.cancel()
        self._templates = new_list
        self.metrics.zero_template_errors([t.label for t in new_list])
        self._reconfigured.set()

    def status(self) -> dict[str, Any]:
        """Per-template status for ``/v1/status`` (never values)."""
        return {
            "templates": [
                {
                    "name": t.label,
                    "destination": str(t.cfg.destination),
                    "secrets": [sel.name for sel in t.cfg.selectors],
                    "format": t.cfg.format,
                    "renders": t.renders,
                    "last_render": t.last_render,
                    "error": t.error,
                    "notifications": t.notifier.sent,
                    "last_notify": t.notifier.last_sent,
                }
                for t in self._templates
            ]
        }

    async def cleanup(self) -> None:
        """Remove rendered files if ``render.cleanup_on_exit`` is set."""
        if not self.render_config.cleanup_on_exit:
            return
        for t in self._templates:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(
                    writer.remove_output, t.cfg.destination, files_format=t.cfg.format == "files"
                )


def _normpath(path: str) -> str:
    # Lexical only (no file system access): watchfiles reports absolute paths.
    return os.path.normpath(path)
