"""Who may call the WebUI extension's ``/dpagg/v1`` API, and what a request may read or spend.

Invariant 10 (docs/privacy.md): only the person at the machine spends or raises a budget, never an
unauthenticated network caller; front-end routes are protected exactly as the host protects its
own API. In AUTOMATIC1111's WebUI (1.10) and Forge that API is ``modules/api/api.py``'s ``Api``:
its routes exist only with ``--api`` (or ``--nowebui``), and with ``--api-auth user:pass[,...]``
each of them requires HTTP Basic credentials, the password compared with
``secrets.compare_digest``. Routes an extension adds in ``on_app_started`` get none of that, so
the extension applies it itself (``scripts/dpagg_webui_tab.py`` is the glue; every decision is a
pure function here, tested without a WebUI):

* no ``--api``: no routes at all (:attr:`ApiAccess.enabled`);
* ``--api-auth`` (else ``--gradio-auth`` / ``--gradio-auth-path``, the WebUI's login): HTTP Basic
  with one of those pairs, compared in constant time, or 401;
* no credentials configured: callers on this machine only (a loopback address, no proxy header,
  no ``--share`` / ``--ngrok`` tunnel, which relays remote users from a local address), else 403;
* a browser request from another site (an ``Origin`` that is neither this server nor one of
  ``--cors-allow-origins``) is refused (403), and a body must be ``application/json`` (415): a web
  page cannot send that cross-site without a CORS preflight, which the WebUI does not grant;
* image folders only under the configured roots (:func:`check_folder`), a release's epsilon and a
  new budget at most the configured cap (:func:`check_epsilon_cap`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dpagg_core.errors import DpaggError
from dpagg_core.paths import resolve_path

SETTINGS_SECTION = ("dpagg", "Private style (DP)")
SETTING_ROOTS = "dpagg_image_roots"
SETTING_ROOTS_LABEL = "Folders dpagg may read images from"
SETTING_MAX_EPSILON = "dpagg_max_epsilon"
SETTING_MAX_EPSILON_LABEL = "Largest epsilon of a release or a new budget (0 = no cap)"
DEFAULT_ROOT_NAME = "dpagg-private"
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host")
JSON_TYPE = "application/json"


def parse_api_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """``--api-auth`` as A1111's ``Api.__init__`` reads it: ``user:password`` pairs separated by
    commas (a password may hold ``:`` here; A1111 itself refuses such a pair at start)."""
    pairs = []
    for item in (text or "").split(","):
        user, sep, password = item.partition(":")
        if sep:
            pairs.append((user, password))
    return tuple(pairs)


def parse_gradio_auth(text: str | None, lines: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """``--gradio-auth`` and the lines of ``--gradio-auth-path`` as A1111's
    ``initialize_util.get_gradio_auth_creds`` reads them (comma-separated, stripped,
    ``user:password`` split at the first ``:``)."""
    pairs = []
    for chunk in [text or "", *lines]:
        for item in chunk.strip().split(","):
            user, sep, password = item.strip().partition(":")
            if sep:
                pairs.append((user, password))
    return tuple(pairs)


@dataclass(frozen=True)
class ApiAccess:
    """How the WebUI was started, as far as the API's protection goes."""

    enabled: bool = False  # --api or --nowebui: the WebUI serves its own API
    credentials: tuple[tuple[str, str], ...] = ()
    source: str = ""  # "--api-auth" | "--gradio-auth" | "" (none configured)
    tunnel: bool = False  # --share / --ngrok: remote users arrive from a local address
    cors_origins: tuple[str, ...] = ()
    cors_regex: str = ""

    @classmethod
    def from_cmd_opts(cls, opts: Any, gradio_creds: Iterable[Iterable[str]] | None = None):
        """From the WebUI's ``shared.cmd_opts``; ``gradio_creds`` is what the WebUI's own
        ``get_gradio_auth_creds()`` yields (``--gradio-auth`` parsed here when it is None)."""

        def opt(name: str) -> Any:
            return getattr(opts, name, None)

        credentials = parse_api_auth(opt("api_auth"))
        source = "--api-auth" if credentials else ""
        if not credentials:
            if gradio_creds is None:
                credentials = parse_gradio_auth(opt("gradio_auth"))
            else:
                credentials = tuple(
                    (str(c[0]), str(c[1])) for c in (tuple(x) for x in gradio_creds) if len(c) == 2
                )
            source = "--gradio-auth" if credentials else ""
        origins = tuple(o.strip() for o in (opt("cors_allow_origins") or "").split(",") if o)
        return cls(
            enabled=bool(opt("api") or opt("nowebui")),
            credentials=credentials,
            source=source,
            tunnel=bool(opt("share") or opt("ngrok")),
            cors_origins=origins,
            cors_regex=str(opt("cors_allow_origins_regex") or ""),
        )


@dataclass(frozen=True)
class Denial:
    """A refused request: the HTTP status, a message that says what to do, extra headers."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def basic_auth_ok(header: str | None, credentials: Iterable[tuple[str, str]]) -> bool:
    """Whether an ``Authorization: Basic ...`` header names one of ``credentials``. Every pair is
    compared with ``secrets.compare_digest`` (as bytes: any characters), user and password."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return False
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    if not sep:
        return False
    ok = False
    for want_user, want_password in credentials:
        same_user = secrets.compare_digest(user.encode(), want_user.encode())
        same_password = secrets.compare_digest(password.encode(), want_password.encode())
        ok |= same_user and same_password
    return ok


def is_local_caller(client_host: str | None, headers: Mapping[str, str], tunnel: bool) -> bool:
    """A caller on this machine: a loopback address, not relayed by a proxy (no forwarding
    header) nor by a ``--share`` / ``--ngrok`` tunnel (whose remote users look local)."""
    if tunnel or not client_host:
        return False
    if any(h in PROXY_HEADERS for h in _lower(headers)):
        return False
    try:
        address = ipaddress.ip_address(client_host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def _cross_site(headers: dict[str, str], access: ApiAccess) -> bool:
    """A browser request sent by a page of another site (its ``Origin`` is not this server and
    not one the WebUI's ``--cors-allow-origins`` lets in). Scripts send no ``Origin``."""
    origin = headers.get("origin")
    if origin is None:
        return False
    if origin in access.cors_origins or "*" in access.cors_origins:
        return False
    if access.cors_regex and re.fullmatch(access.cors_regex, origin):
        return False
    netloc = urlsplit(origin).netloc if origin != "null" else ""
    return not netloc or netloc.lower() != headers.get("host", "").lower()


def decide(
    access: ApiAccess, *, client_host: str | None, headers: Mapping[str, str], method: str
) -> Denial | None:
    """None if the request may be served, else why not (checked in this order: credentials or a
    local caller, the site a browser sent it from, the body's content type)."""
    h = _lower(headers)
    if access.credentials:
        if not basic_auth_ok(h.get("authorization"), access.credentials):
            return Denial(
                401,
                f"Incorrect username or password: the dpagg API takes the WebUI's {access.source} "
                "credentials as HTTP Basic auth",
                {"WWW-Authenticate": "Basic"},
            )
    elif not is_local_caller(client_host, h, access.tunnel):
        return Denial(
            403,
            "the dpagg API answers only callers on this machine while the WebUI has no "
            "credentials; a network caller may not spend a privacy budget. Fix: start the WebUI "
            "with --api-auth user:password and send them as HTTP Basic auth (or call from the "
            "WebUI machine itself)",
        )
    if _cross_site(h, access):
        return Denial(
            403,
            f"cross-site request from {h.get('origin')!r} refused: a web page may not call the "
            "dpagg API. Fix: call it from a script, or add the origin to --cors-allow-origins",
        )
    if method.upper() in ("POST", "PUT", "PATCH"):
        media = h.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != JSON_TYPE:
            return Denial(
                415,
                f"the body must be JSON sent as Content-Type: {JSON_TYPE} (got "
                f"{media or 'no content type'})",
            )
    return None


# ----------------------------------------------------------------------------------------------
# What a request may read and spend
# ----------------------------------------------------------------------------------------------


def real_path(path: str | os.PathLike[str]) -> Path:
    """``paths.resolve_path`` (``~``, variables, absolute), then every symlink resolved."""
    return Path(os.path.realpath(resolve_path(path)))


def image_roots(setting: str | None, data_dir: str | os.PathLike[str]) -> list[Path]:
    """The folders images may be read from: the setting's entries (one per line, or separated by
    ``;``), or ``<WebUI data dir>/dpagg-private`` when it is empty."""
    entries = [e.strip() for e in re.split(r"[;\n]", setting or "") if e.strip()]
    return [real_path(e) for e in entries] or [real_path(Path(data_dir) / DEFAULT_ROOT_NAME)]


def within(path: str | os.PathLike[str], roots: Iterable[Path]) -> bool:
    """Whether ``path`` is one of ``roots`` (real paths) or inside one, symlinks followed: a link
    inside a root to a folder outside it is outside."""
    real = real_path(path)
    return any(real == root or root in real.parents for root in roots)


def check_folder(folder: str, roots: Iterable[Path], what: str = "image folder") -> None:
    """Refuse a folder outside every root (:func:`within`). An empty value is left to the
    caller's own "choose a folder" error."""
    if not str(folder or "").strip():
        return
    roots = list(roots)
    if within(folder, roots):
        return
    shown = ", ".join(str(r) for r in roots)
    raise DpaggError(
        f"{what} {folder} is outside the folders dpagg may read ({shown}). Fix: move the "
        f"images into one of them, or add their folder to the WebUI setting "
        f"'{SETTING_ROOTS_LABEL}' ({SETTING_ROOTS}) in Settings > dpagg"
    )


def max_epsilon(setting: Any) -> float | None:
    """The cap of the ``dpagg_max_epsilon`` setting, or None (0, empty or invalid: no cap)."""
    try:
        cap = float(setting or 0)
    except (TypeError, ValueError):
        return None
    return cap if cap > 0 else None


def check_epsilon_cap(epsilon: float | None, cap: float | None, what: str) -> None:
    """Refuse an epsilon above the cap, before anything is trained or spent."""
    if cap is not None and epsilon is not None and epsilon > cap:
        raise DpaggError(
            f"{what} {epsilon:g} is above the largest epsilon allowed here ({cap:g}). Fix: ask "
            f"for at most {cap:g}, or raise the WebUI setting '{SETTING_MAX_EPSILON_LABEL}' "
            f"({SETTING_MAX_EPSILON}) in Settings > dpagg. Nothing was spent."
        )
