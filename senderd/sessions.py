"""The HTTP sessions senderd opens to token servers and runtimes: TLS always verified, answers never inflated
by aiohttp (see `bounded`), and the set's proxy: its `proxy` URL, none (`proxy = false`), or, by default,
`HTTPS_PROXY` / `https_proxy` / `NO_PROXY` from the environment, looked up once per host.
"""

from __future__ import annotations

import ssl
import urllib.request
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from senderd.config import CredentialsConfig


def open_session(
    context: ssl.SSLContext, credentials: CredentialsConfig, *, limit: int, **options: Any
) -> aiohttp.ClientSession:
    """A session over `context`. Requests name their proxy themselves (`proxy_for`): aiohttp's own
    `trust_env` would look the environment (and ~/.netrc, in a thread) up again for every request."""
    connector = aiohttp.TCPConnector(ssl=context, limit=limit)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False, **options)


def proxy_for(url: str, credentials: CredentialsConfig) -> str | None:
    """The proxy a request to `url` goes through (CONNECT tunnels for https, so a client certificate reaches
    the server itself): the set's `proxy`, none with `proxy = false`, else `HTTPS_PROXY` / `https_proxy`
    (`HTTP_PROXY` for http) unless `NO_PROXY` names the host."""
    if credentials.proxy is False:
        return None
    if isinstance(credentials.proxy, str):
        return credentials.proxy
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get("https" if url.startswith("https:") else "http")
    host = urlsplit(url).hostname
    if not proxy or (host and urllib.request.proxy_bypass_environment(host, proxies)):  # type: ignore[attr-defined]
        return None
    return proxy


def shown_proxy(url: str | None) -> str:
    """A proxy URL fit for a message: scheme, host and port, never its user name or password."""
    if not url:
        return "the proxy"
    parts = urlsplit(url)
    host = parts.hostname or "?"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, "", "", ""))


def proxy_problem(exc: BaseException, credentials: CredentialsConfig) -> str | None:
    """What a failure through a proxy says (naming the proxy, never its password), or None when `exc` is
    not a proxy's failure."""
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return (
            f"{_which_proxy(credentials)} refused the connection (HTTP {exc.status} {exc.message}): check that "
            "it allows CONNECT to this host and port, and its credentials"
        )
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"{_which_proxy(credentials)} is unreachable ({reason}): check the proxy's address"
    return None


def _which_proxy(credentials: CredentialsConfig) -> str:
    if isinstance(credentials.proxy, str):
        return f"proxy {shown_proxy(credentials.proxy)} (credentials.proxy)"
    configured = urllib.request.getproxies().get("https")
    return f"proxy {shown_proxy(configured)} (HTTPS_PROXY)"
