"""Wiring of the running agent: supervised parts, signals, reload, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import watchfiles
from aiohttp import web

from agent.audit import AuditLog
from agent.cache import SecretCache
from agent.config import AgentConfig, load_config
from agent.core import Core
from agent.errors import AgentError, ConfigError
from agent.keyrotation import KeyRotation
from agent.keywatch import KeyWatch
from agent.logsetup import setup_logging
from agent.metrics import Metrics
from agent.refresh import Refresher, matches
from agent.render.renderer import Renderer
from agent.render.sources import CacheSource
from agent.rotation.engine import RotationEngine
from agent.rotation.scheduler import RotationScheduler
from agent.server.access import AccessPolicy
from agent.server.app import ServerState, build_app
from agent.server.arn import ArnSource
from agent.server.connections import GuardedRunner, listener_limits
from agent.server.tcp import start_metrics_listener, start_tcp_listener
from agent.sockets import bind_unix_site, quiet_accept_errors
from agent.supervise import Supervisor, error_kind

log = logging.getLogger(__name__)


class Daemon:
    """The agent process: serve, refresh, reload on SIGHUP, stop on SIGTERM/SIGINT."""

    def __init__(self, config: AgentConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.core = Core.build(config, metrics=self.metrics)
        self.audit = AuditLog.from_config(
            config.audit, metrics=self.metrics, base_dir=config.base_dir
        )
        self.cache = SecretCache(
            self.core.resolver, settings=config.refresh, metrics=self.metrics, audit=self.audit
        )
        #: Secrets loaded and every template rendered once (``/readyz``).
        self.ready = asyncio.Event()
        self.refresher = Refresher(
            self.cache,
            self.core.store,
            settings=config.refresh,
            patterns=config.secrets,
            metrics=self.metrics,
        )
        self.state = ServerState(
            self.cache,
            AccessPolicy(config.access),
            self.metrics,
            ready=self.ready,
            max_connections=config.listen.max_connections,
            audit=self.audit,
            region=getattr(config.store, "region", None) or "local",
            arns=self.core.store if isinstance(self.core.store, ArnSource) else None,
        )
        self.state.status_providers.append(lambda: {"audit": self.audit.status()})
        guard = self.core.resolver.guard
        if guard is not None:
            guard.audit = self.audit
            self.state.status_providers.append(guard.status)
        self.state.status_providers.append(self._key_status)
        self.renderer = Renderer(
            config.templates,
            CacheSource(self.cache),
            render_config=config.render,
            metrics=self.metrics,
            audit=self.audit,
        )
        self.cache.subscribe(self.renderer.on_secret_changed)
        #: Extra long-running coroutines (key watch, rotation), each run as a supervised
        #: part named after its class (``KeyWatch.run`` -> ``key_watch``).
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.supervisor = Supervisor(
            metrics=self.metrics,
            backoff_initial=config.refresh.backoff_initial,
            backoff_max=config.refresh.backoff_max,
        )
        self.state.status_providers.append(self.supervisor.status)
        self.keywatch = KeyWatch(self.core.providers, self.core.datakeys, metrics=self.metrics)
        self.background.append(self.keywatch.run)
        schedules = {
            name: cfg.rotate_every
            for name, cfg in config.keys.items()
            if cfg.rotate_every is not None
        }
        if schedules:
            self.keyrotation = KeyRotation(
                self.core.providers,
                schedules,
                self.core.datakeys,
                metrics=self.metrics,
                audit=self.audit,
            )
            self.background.append(self.keyrotation.run)
            self.state.status_providers.append(self.keyrotation.status)
        self.rotation = RotationScheduler(
            RotationEngine(
                self.core.writer(), self.core.resolver, metrics=self.metrics, audit=self.audit
            ),
            config.rotation,
            metrics=self.metrics,
            on_rotated=self._rotated,
        )
        self.background.append(self.rotation.run)
        self.state.status_providers.append(self.rotation.status)
        self.background.append(self.audit.run)
        self.state.status_providers.append(self.renderer.status)
        self.background.append(self.renderer.watch_template_files)
        self.shutdown = asyncio.Event()
        self._config_file = Path(os.path.abspath(config.source)) if config.source else None
        self._runners: list[web.AppRunner] = []
        #: (st_dev, st_ino) of the socket this agent bound: only that one is removed on exit.
        self._socket_id: tuple[int, int] | None = None
        self.state.status_providers.append(self._connection_status)
        self._interrupts = 0
        self.reload_hooks: list[Callable[[AgentConfig], None]] = [self.rotation.reconfigure]
        #: How a reload reads the config file (``run --aws-agent-config`` replaces it).
        self.loader: Callable[[Path], AgentConfig] = load_config

    async def _rotated(self, name: str) -> None:
        """Serve a rotation made here at once, without waiting for a watch or poll."""
        if name in self.cache.names() or matches(name, self.refresher.patterns):
            with contextlib.suppress(AgentError):
                await self.cache.refresh(name, trigger="request")

    def _key_status(self) -> dict[str, Any]:
        """Each key provider's last error and key (never key material), for /v1/status."""
        out = []
        for name, provider in self.core.providers.items():
            report = getattr(provider, "status", None)
            out.append(report() if callable(report) else {"provider": name, "last_error": None})
        return {"keys": out}

    def _connection_status(self) -> dict[str, Any]:
        """Open connections and what the guards closed, per listener (for /v1/status)."""
        return {
            "connections": {
                r.listener: r.guard.status()
                for r in self._runners
                if isinstance(r, GuardedRunner) and r.guard is not None
            }
        }

    # ----------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Serve until :attr:`shutdown` is set; clean up everything started."""
        self._install_signals()
        try:
            await self.renderer.probe()
            await self._start_listeners()
            # From here on nothing ends the process but SIGTERM/SIGINT: a failing
            # part is restarted alone by the supervisor.
            for name, factory in (
                ("startup_load", self._startup_load),
                ("readiness", self._become_ready),
                ("refresher", self.refresher.run),
                ("config_watch", self._watch_config),
                ("renderer", self.renderer.run),
            ):
                self.supervisor.add(factory, name=name)
            async with asyncio.TaskGroup() as tg:
                parts = tg.create_task(self.supervisor.run(self.background))
                await self.shutdown.wait()
                log.info("shutting down")
                parts.cancel()
        finally:
            await self._stop_listeners()
            await self.renderer.cleanup()
            await self.cache.aclose()
            await self.core.aclose()
            await self.audit.aclose()
            self._remove_signals()

    async def _become_ready(self) -> None:
        """Set :attr:`ready` once the secrets are loaded and every template rendered once."""
        await self.refresher.ready.wait()
        await self.renderer.settled()
        self.ready.set()
        self.metrics.ready.set(1)
        log.info("ready: serving, with every template rendered once")

    async def _startup_load(self) -> None:
        try:
            await self.refresher.load_all()
        except AgentError as exc:
            log.warning("initial load incomplete (%s); the refresher keeps trying", exc.message)
            self.refresher.poke()

    async def _start_listeners(self) -> None:
        listen = self.config.listen
        quiet_accept_errors(asyncio.get_running_loop())
        names = ["unix"] + ["tcp"] * (listen.tcp is not None)
        names += ["metrics"] * (self.config.metrics.listen is not None)
        limits = listener_limits(listen.connections, names)
        prefix = listen.tcp.aws_path_prefix if listen.tcp is not None else "/v1/"
        app = build_app(self.state, listener="unix", aws_path_prefix=prefix)
        runner = GuardedRunner(app, listener="unix", limits=limits["unix"])
        await runner.setup()
        self._runners.append(runner)
        await bind_unix_site(
            runner,
            listen.socket,
            mode=listen.socket_mode,
            group=listen.socket_group,
            shared_volume=listen.shared_volume,
        )
        st = os.stat(listen.socket, follow_symlinks=False)
        self._socket_id = (st.st_dev, st.st_ino)
        log.info("serving on unix socket %s", listen.socket)
        if listen.tcp is not None:
            trunner, port = await start_tcp_listener(
                self.state, listen.tcp, base_dir=self.config.base_dir, limits=limits["tcp"]
            )
            self._runners.append(trunner)
            log.info("serving on loopback TCP port %d (token required)", port)
        if self.config.metrics.listen is not None:
            self._runners.append(
                await start_metrics_listener(
                    self.state, self.config.metrics.listen, limits=limits["metrics"]
                )
            )
            log.info("metrics on http://%s/metrics", self.config.metrics.listen)

    async def _stop_listeners(self) -> None:
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        # Never the path of a start that failed (e.g. another live agent's socket).
        bound, self._socket_id = self._socket_id, None
        path = self.config.listen.socket
        try:
            st = os.stat(path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == bound:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove the socket %s: %s", path, exc.strerror)

    # -------------------------------------------------------------------- signals

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _on_stop(self) -> None:
        self.shutdown.set()

    def _on_interrupt(self) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            log.warning("second interrupt: exiting now")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.listen.socket)
            os._exit(130)
        self.shutdown.set()

    # --------------------------------------------------------------------- reload

    def request_reload(self) -> None:
        """Reload the config file (SIGHUP); an invalid one is rejected, the old one kept."""
        source = self.config.source
        if source is None:
            log.warning("reload requested but the config was not loaded from a file")
            return
        # Called from a signal handler and the config watch: it must never raise.
        try:
            self.audit.reopen()
            new = self.loader(Path(source))
        except ConfigError as exc:
            self._reject(exc.message)
            return
        except Exception as exc:  # a loader bug must not kill the agent or the watch
            self._reject(f"{source}: could not be loaded ({error_kind(exc)})")
            return
        old = self.config
        try:
            self.apply(new)
        except Exception as exc:
            self._reject(f"{source}: could not be applied ({error_kind(exc)})")
            with contextlib.suppress(Exception):
                self.apply(old, announce=False)  # put the parts back as they were

    def _reject(self, message: str) -> None:
        self.metrics.config_reloads.labels("rejected").inc()
        with contextlib.suppress(Exception):
            self.audit.record("config_reloaded", outcome="rejected", reason=message[:500])
        log.error("config reload rejected, keeping the running config: %s", message)

    async def _watch_config(self) -> None:
        """Reload when the config file changes (editors replace it: watch its directory)."""
        path = self._config_file
        if path is None:
            return

        def is_config(_change: object, changed: str) -> bool:
            return Path(changed).name == path.name

        # A failure here (e.g. the directory gone, inotify limits) ends this part;
        # the supervisor restarts the watch with backoff. SIGHUP reloads meanwhile.
        async for _ in watchfiles.awatch(
            path.parent, watch_filter=is_config, recursive=False, debounce=200, step=50
        ):
            self.request_reload()

    def apply(self, new: AgentConfig, *, announce: bool = True) -> None:
        """Apply a validated config; parts that need a restart keep their old values."""
        old = self.config
        for part in ("store", "keys", "write_keys", "listen", "metrics", "datakeys"):
            if announce and getattr(old, part) != getattr(new, part):
                log.warning("config reload: %r changed; it takes effect after a restart", part)
        setup_logging(new.log)
        self.state.policy = AccessPolicy(new.access)
        for name in self.cache.names():
            if matches(name, old.secrets) and not matches(name, new.secrets):
                self.cache.remove(name)
        self.refresher.patterns = tuple(new.secrets)
        self.refresher.settings = new.refresh
        self.cache.settings = new.refresh
        self.renderer.render_config = new.render
        self.renderer.reconfigure(new.templates)
        for hook in self.reload_hooks:
            hook(new)
        self.config = new.model_copy(
            update={
                "store": old.store,
                "keys": old.keys,
                "write_keys": old.write_keys,
                "listen": old.listen,
                "metrics": old.metrics,
                "datakeys": old.datakeys,
            }
        )
        if not announce:
            return
        self.metrics.config_reloads.labels("applied").inc()
        self.audit.record("config_reloaded", outcome="applied")
        log.info("config reloaded from %s", new.source)
        self.refresher.poke()
