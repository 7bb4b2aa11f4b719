"""Host headers and bind addresses: which names are loopback, which a server accepts."""

from __future__ import annotations

import ipaddress
import re

LOOPBACK_NAMES = ("localhost",)  # besides loopback IP literals (127.0.0.0/8, ::1)
HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # DNS names and IPv4 literals, lowercased


def host_name(header: str) -> str | None:
    """The host part of a Host header, normalized; None if it is not one.

    Lowercased, without port, brackets or a trailing dot: 'LOCALHOST.:8000' -> 'localhost',
    '[::1]:8000' -> '::1', '::1' -> '::1' (a bare IPv6 literal, no port), '127.0.0.1' ->
    '127.0.0.1'; 'a b', 'x:port' and '[::1' -> None.
    """
    split = split_host(header)
    return None if split is None else split[0]


def split_host(header: str) -> tuple[str, str | None] | None:
    """(normalized name, port or None) of a Host header or --allowed-hosts entry (see
    `host_name`); None if malformed. ASCII only, so no Unicode case folding maps a name onto
    'localhost' (the Kelvin sign lowercases to 'k')."""
    if not header.isascii():
        return None
    text = header.strip().lower()
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        address, sep, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if not sep or (rest and not _is_port(port)) or ":" not in address:
            return None
        return (address, port) if _is_ip(address) else None
    if text.count(":") > 1:  # a bare IPv6 literal cannot carry a port
        return (text, None) if _is_ip(text) else None
    name, colon, port = text.partition(":")
    name = name.removesuffix(".")
    if (colon and not _is_port(port)) or not HOST_NAME.fullmatch(name):
        return None
    return name, port or None


def _is_port(text: str | None) -> bool:
    return text is not None and text.isascii() and text.isdigit() and len(text) <= 5


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(name: str) -> bool:
    """'localhost' or a loopback IP literal (127.0.0.0/8, ::1), after `host_name`.

    Exact names only: '127.attacker.example' or 'localhost.evil.com' are names anyone can
    point at any address (DNS rebinding), so they are not loopback.
    """
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_bind(host: str) -> bool:
    """Whether `serve --host` binds loopback only (and so guards against DNS rebinding)."""
    name = host_name(host)
    return name is not None and is_loopback(name)


def is_allowed_host(header: str, allowed_hosts: tuple[str, ...] = ()) -> bool:
    """Whether a loopback-bound server answers a request with this Host header."""
    name = host_name(header)
    return name is not None and (is_loopback(name) or name in allowed_hosts)
