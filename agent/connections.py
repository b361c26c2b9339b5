"""The HTTP connection pool of the agent's clients (the API server, the fabric managers).

On Python before 3.12.8 (and 3.13.0), asyncio leaks the socket under a TLS connection that is
closed before its TLS shutdown completes (fixed by CPython PR 118960): a watch
cancelled at a role's restart or at shutdown keeps its file descriptor until the garbage collector
finds it, and a long-running process accumulates them. aiohttp's remedy for those versions is
`enable_cleanup_closed`: it aborts such transports after 2 s and when the pool closes. It is
turned on exactly where aiohttp says it is needed (`aiohttp.connector.NEEDS_CLEANUP_CLOSED`'s
condition); aiohttp warns (DeprecationWarning) when it is asked for elsewhere.
"""

from __future__ import annotations

import ssl
import sys

import aiohttp

#: Python releases whose asyncio leaks sockets under TLS connections closed mid-shutdown.
LEAKS_CLOSED_TLS: bool = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (
    3,
    13,
    1,
)


def connector(ssl_context: ssl.SSLContext | bool, *, limit: int) -> aiohttp.TCPConnector:
    """A connection pool of at most `limit` connections verifying TLS with `ssl_context` (True:
    the default trust store), aborting TLS connections whose shutdown hangs where asyncio would
    leak them."""
    return aiohttp.TCPConnector(
        ssl=ssl_context, limit=limit, enable_cleanup_closed=LEAKS_CLOSED_TLS
    )
