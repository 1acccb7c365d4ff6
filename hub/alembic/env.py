"""Alembic environment for the fleet store.

The database URL comes from the caller (``hub.store.migrate`` passes a live connection, or sets
``sqlalchemy.url``); run standalone, it falls back to the hub's config from the environment
(``EDGEFLEET_HUB_DB_URL``), so ``alembic upgrade head`` and ``edgefleet-hub migrate`` agree.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from hub import models

config = context.config
target_metadata = models.Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from hub import config as hub_config

    return hub_config.HubConfig().db_url


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
    else:
        engine = create_engine(_url())
        with engine.connect() as conn:
            _run(conn)
        engine.dispose()
