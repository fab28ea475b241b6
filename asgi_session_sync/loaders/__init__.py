"""Ready-made snapshot loaders for common storage, each behind an optional extra.

Import the one you use by its module, so its dependency is needed only when you do::

    from asgi_session_sync.loaders.sqlalchemy import sqlalchemy_loader

- :mod:`asgi_session_sync.loaders.sqlalchemy`: a session row and its interactions, read with
  SQLAlchemy's asyncio extension (the ``sqlalchemy`` extra for SQLite,
  ``postgres`` for PostgreSQL).
"""
