"""``asmkit serve``: an index workspace behind an HTTP API and a web page.

Needs the ``serve`` extra (``pip install 'asmkit[serve]'``: FastAPI, uvicorn,
python-multipart, prometheus_client). See docs/serve.md.

- :class:`ServedIndex`: the workspace in memory, searched concurrently, updated through a
  write-ahead log (:mod:`asmkit.serve.wal`); :class:`ServedHybrid`: a hybrid workspace,
  searched only; :func:`open_served` picks the one a workspace needs.
- :func:`create_app`: the FastAPI application over a ``ServedIndex``.
- :func:`serve`: open a workspace and run the application with uvicorn.
"""

from .app import create_app
from .service import KeyConflict, KeyNotFound, ReadOnlyIndex, ServedHybrid, ServedIndex, open_served
from .settings import Settings, check_key, read_token_file

__all__ = [
    "KeyConflict",
    "KeyNotFound",
    "ReadOnlyIndex",
    "ServedHybrid",
    "ServedIndex",
    "Settings",
    "check_key",
    "create_app",
    "open_served",
    "read_token_file",
    "serve",
]


def serve(index, settings: Settings | None = None) -> None:
    """Serve the workspace ``index`` until interrupted (SIGINT/SIGTERM fold the log first).

    Parameters
    ----------
    index : path-like
        A workspace made by ``asmkit index`` (a hybrid one is served read-only).
    settings : Settings, optional
    """
    import uvicorn

    settings = settings or Settings()
    app = create_app(open_served(index, settings), settings)
    # h11, not httptools even where installed: with asyncio's event loop, httptools spent
    # several times longer outside the handler on descriptor uploads (docs/serve.md).
    uvicorn.run(app, host=settings.host, port=settings.port, http="h11", log_level="warning", access_log=False)
