"""A running hub: store, ingest, sweeper and API in one process (``edgefleet-hub run``).

``async with service.running(config) as hub:`` is the lifetime; tests and the demo use it
in-process, the CLI wraps it with signal handling. Leaving the block stops the API, ingest and
sweeper and closes the store; anything ingested but not committed stays unacknowledged at the broker
and is delivered again next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
import uvicorn
from fastapi import FastAPI

from hub import api, commands, ingest, replicas, sweeper
from hub.config import HubConfig
from hub.context import HubContext
from hub.store import open_store

log = structlog.get_logger("edgefleet.hub")


@dataclass
class Hub:
    ctx: HubContext
    app: FastAPI
    ingest: ingest.Ingest
    #: The API's bound port (useful with ``api.port: 0``); None when the API is not served.
    api_port: int | None

    @property
    def api_url(self) -> str:
        return f"http://{self.ctx.config.api.host}:{self.api_port}"


@contextlib.asynccontextmanager
async def running(config: HubConfig, *, serve_api: bool = True) -> AsyncIterator[Hub]:
    store = await asyncio.to_thread(open_store, config.db_url, migrate=config.migrate_on_start)
    try:
        key = commands.load_key(config.commands.key_file) if config.commands.key_file else None
        ctx = HubContext(config=config, store=store, command_key=key)
        app = api.create_app(ctx)
        pipeline = ingest.Ingest(ctx)
        started = await replicas.register(ctx)
        tasks = [
            asyncio.create_task(ingest.run(ctx, pipeline=pipeline), name="hub-ingest"),
            asyncio.create_task(sweeper.run(ctx), name="hub-sweeper"),
            asyncio.create_task(replicas.run(ctx, pipeline=pipeline, started=started), name="hub-replicas"),
        ]
        server: uvicorn.Server | None = None
        port: int | None = None
        if serve_api:
            server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    host=config.api.host,
                    port=config.api.port,
                    log_config=None,
                    log_level=logging.WARNING,
                    access_log=False,
                    # Open server-sent-event streams (dashboard) would otherwise hold shutdown forever.
                    timeout_graceful_shutdown=2,
                    lifespan="off",
                )
            )
            tasks.append(asyncio.create_task(server.serve(), name="hub-api"))
            while not server.started:
                if tasks[-1].done():
                    tasks[-1].result()  # raises what stopped the server (e.g. port in use)
                    raise RuntimeError("API server exited during startup")
                await asyncio.sleep(0.02)
            port = server.servers[0].sockets[0].getsockname()[1]
        log.info(
            "hub running",
            db=store.dialect,
            api=f"{config.api.host}:{port}" if port else None,
            broker=f"{config.mqtt.host}:{config.mqtt.port}",
            commands=key is not None,
        )
        try:
            yield Hub(ctx=ctx, app=app, ingest=pipeline, api_port=port)
        finally:
            if server is not None:
                server.should_exit = True
            for task in tasks:
                if task.get_name() != "hub-api":
                    task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    finally:
        await asyncio.to_thread(store.close)
