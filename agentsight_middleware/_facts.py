"""Pure helpers that turn request headers into visitor facts.

Everything here works on ``str`` (headers already decoded as latin-1), is shared by
the ASGI and WSGI glue, and is *total*: any input, however hostile, yields a value
or ``None`` and never an exception, because a tracking helper must never be the
reason a customer's request fails.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Literal
from urllib.parse import quote, unquote_plus, urlsplit

from ._device import _classify as _classify
from ._device import classify_user_agent

__all__ = [
    "DEFAULT_NON_BROWSER_AGENTS",
    "MAX_URL_LENGTH",
    "ForwardedHeader",
    "TrustedProxies",
    "best_language",
    "classify_user_agent",
    "client_ip",
    "client_scheme",
    "compile_agent_matcher",
    "cut_text",
    "page_url",
    "redact_path",
    "redact_query",
    "redact_url",
]

# ---------------------------------------------------------------------------
# Trusted proxies and the client address
# ---------------------------------------------------------------------------

ForwardedHeader = Literal["auto", "forwarded", "x-forwarded-for", "x-real-ip"]
_HEADER_CHOICES: Final = ("auto", "forwarded", "x-forwarded-for", "x-real-ip")

# No real deployment chains more proxies than this; walking further would only let a
# client that pads its forged header with trusted-looking addresses burn our CPU.
_MAX_HOPS: Final = 32
# Legit Forwarded headers are ~30-100 bytes per hop. Quoted strings mean a Forwarded
# header can only be parsed left to right, so instead of truncating (which could
# desynchronise quotes) an over-long one is refused outright.
_MAX_FORWARDED_CHARS: Final = 2048
# An address with a zone id and a port is well under this; anything longer is junk
# and must not be used as an lru_cache key.
_MAX_ADDRESS_CHARS: Final = 100

_OWS = r"[ \t]*"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# RFC 7239 wants ":" and "[" quoted, but some proxies emit ``for=1.2.3.4:80``
# unquoted; accepting them is harmless as long as '"' can never appear unquoted,
# which is what keeps quote parsing in sync (see _forwarded_elements).
_FWD_VALUE = r'"(?:[^"\\]|\\.)*"|[^\s",;]*'
_FWD_PAIR = rf"{_TOKEN}{_OWS}={_OWS}(?:{_FWD_VALUE})"
# Shaped so that no two quantifiers can compete for the same characters (each OWS is
# followed by a pair or a separator): a failing match then costs linear time, not
# exponential, whatever a client sends.
_FORWARDED_VALID = re.compile(
    rf"{_OWS}(?:{_FWD_PAIR}{_OWS})?(?:[;,]{_OWS}(?:{_FWD_PAIR}{_OWS})?)*", re.DOTALL
)
_FORWARDED_TOKENS = re.compile(rf"({_TOKEN}){_OWS}={_OWS}({_FWD_VALUE})|(,)", re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
# RFC 7239 node-port: a number, or an obfuscated "_token".
_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# An IPv4 address as ipaddress takes one (four decimal octets, no leading zero) is its own
# canonical text: a new visitor's address (most are IPv4) is told so at ~0.4 us, not parsed
# into an object and written back (~3 us, twice: once more to look it up in the networks).
_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


@functools.lru_cache(maxsize=4096)
def _normalise_ip(host: str) -> str | None:
    """Canonical text of a bare IP address, or None.

    Cached because the same peers and proxies show up on every request.
    """
    if _IPV4.fullmatch(host) is not None:
        return host
    if "%" in host:
        # A zone id ("fe80::1%eth0") only means something on the receiving host.
        if ":" not in host:
            return None
        host = host.partition("%")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; one address, one text.
        return str(address.ipv4_mapped)
    return str(address)


def peer_address(value: str | None) -> str | None:
    """The socket peer as a canonical IP, or None (a unix socket path, garbage)."""
    return _address(value)


def _address(value: str | None) -> str | None:
    if not value or len(value) > _MAX_ADDRESS_CHARS:
        return None
    return _normalise_ip(value.strip())


def _hop_address(value: str | None) -> str | None:
    """The IP in one hop of a forwarding chain (``[v6]:port``, ``ip:port``, quoted...)."""
    return hop_address_and_port(value)[0]


def hop_address_and_port(value: str | None) -> tuple[str | None, str]:
    """The IP in one hop of a forwarding chain and the port written with it ("" for none)."""
    if value is None:
        return None, ""
    text = value.strip()
    if not text or len(text) > _MAX_ADDRESS_CHARS:
        return None, ""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            return None, ""
        rest = text[end + 1 :]
        if rest and not (rest[0] == ":" and _PORT.fullmatch(rest, 1)):
            return None, ""
        host = text[1:end]
        # Brackets are only for IPv6; "[1.2.3.4]" is someone else's syntax.
        return (_normalise_ip(host) if ":" in host else None), rest[1:]
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return (_normalise_ip(host), port) if _PORT.fullmatch(port) else (None, "")
    # Zero colons: IPv4. Two or more: IPv6, which cannot carry a port without brackets.
    return _normalise_ip(text), ""


def _ipv4_network_of_mapped(network: ipaddress.IPv6Network) -> _IPNetwork:
    # Hops are normalised from ::ffff:a.b.c.d to a.b.c.d, so a mapped range in the
    # config has to be translated the same way or it could never match.
    mapped = network.network_address.ipv4_mapped
    if mapped is None or network.prefixlen < 96:
        return network
    return ipaddress.IPv4Network((mapped, network.prefixlen - 96))


_ENTRY_EXAMPLES: Final = "e.g. '10.0.0.0/8', '2001:db8::/32', '127.0.0.1' or '::1'"


class TrustedProxies:
    """Which peers are reverse proxies whose forwarding headers may be believed.

    * a list of IPs / CIDR networks (IPv4 or IPv6): those peers are proxies;
    * ``"*"`` (bare or in the list): every peer is a proxy. Only safe when the app is
      unreachable except through proxies that *overwrite* the forwarding header;
    * an int N >= 1: exactly N proxies stand in front of the app, so trust is by
      position in the chain, not by address (``0`` is the same as None);
    * None or an empty list: nobody; forwarding headers are ignored.

    ``header`` pins which forwarding header is read. ``"auto"`` takes ``Forwarded``,
    else ``X-Forwarded-For``, else ``X-Real-IP``; that is only safe if the proxy
    strips (or overwrites) every one of them it does not set itself, because a client
    can send, e.g., a ``Forwarded`` header that a proxy appending only to
    ``X-Forwarded-For`` passes through untouched. Pinning the header the proxy
    actually writes removes that risk. The scheme is read from the header the
    address is read from (see :func:`client_scheme`).
    """

    __slots__ = (
        "_clients",
        "_contains",
        "_enabled",
        "_everyone",
        "_header",
        "_hops",
        "_ipv4_networks",
        "_literals",
        "_networks",
        "_peers",
        "_trust_all",
    )

    def __init__(
        self,
        trusted: Sequence[str] | int | None,
        *,
        header: ForwardedHeader = "auto",
    ) -> None:
        if header not in _HEADER_CHOICES:
            raise ValueError(
                f"trusted_proxy_header must be one of {', '.join(_HEADER_CHOICES)}, got {header!r}"
            )
        # Read-only, as everything here: the caches below (_clients) hold answers read
        # with this header and would go on giving them if it changed.
        self._header: ForwardedHeader = header
        self._trust_all = False
        self._hops = 0
        literals: set[str] = set()
        networks: list[_IPNetwork] = []

        if trusted is None:
            pass
        elif isinstance(trusted, bool):
            # bool is an int; True meaning "one proxy" would be a silent surprise.
            raise ValueError(
                f"trusted_proxies must be a list of addresses, '*' or a hop count, got {trusted!r}"
            )
        elif isinstance(trusted, int):
            if trusted < 0:
                raise ValueError(
                    "trusted_proxies as a hop count must be >= 1 (0 or None: trust nobody), "
                    f"got {trusted}"
                )
            if trusted > 1 and header == "x-real-ip":
                # X-Real-IP holds one address, the one the nearest proxy saw: the N-th hop
                # from the end is never in it, and every visitor would go without an IP.
                raise ValueError(
                    f"trusted_proxy_header='x-real-ip' holds one address, so a hop count of "
                    f"{trusted} never finds the client: with {trusted} proxies, read the header "
                    "they all append to ('x-forwarded-for' or 'forwarded')"
                )
            self._hops = trusted
        elif isinstance(trusted, str):
            if trusted.strip() != "*":
                # Iterating a str would trust single characters; a comma-separated
                # string is ambiguous too, so make the caller say what they mean.
                text = trusted.strip()
                suggestion = (
                    repr(int(text))
                    if text.isdigit()
                    else repr([part.strip() for part in text.split(",") if part.strip()])
                )
                raise ValueError(
                    f"trusted_proxies must be a list such as {suggestion} (or a hop count), "
                    f"not a bare string like {trusted!r} (only '*' is accepted bare)"
                )
            self._trust_all = True
        elif isinstance(trusted, (bytes, bytearray)):
            raise ValueError(f"trusted_proxies must be a list of str, got {trusted!r}")
        else:
            try:
                entries = list(trusted)
            except TypeError:
                raise ValueError(
                    "trusted_proxies must be a list of addresses, '*' or a hop count, "
                    f"got {type(trusted).__name__}"
                ) from None
            for entry in entries:
                self._add_entry(entry, literals, networks)

        self._literals = frozenset(literals)
        self._networks = tuple(networks)
        # The IPv4 networks as (first address, netmask) integers: a new address is looked
        # up in them without building an ipaddress object of it.
        self._ipv4_networks = tuple(
            (int(network.network_address), int(network.netmask))
            for network in networks
            if network.version == 4
        )
        self._enabled = self._trust_all or self._hops > 0 or bool(literals or networks)
        # "0.0.0.0/0" or "::/0" trusts every client address of its family, as "*" does:
        # every hop is then believed, and the left-most (the client's to write) is taken.
        # The guards that "*" needs (no agreement between headers of different lengths, the
        # warning's advice) are needed there too.
        self._everyone = self._trust_all or any(network.prefixlen == 0 for network in networks)
        # Bounded: a busy site sees many distinct peers; this is a hot path.
        self._contains: Callable[[str], bool] = functools.lru_cache(maxsize=1024)(self._lookup)
        # Raw peer text -> is a proxy. Behind a proxy the same few peers come every
        # request, and a plain dict costs a fraction of the normalise + lookup calls.
        self._peers: dict[str | None, bool] = {}
        # (peer, forwarding headers) -> client IP: see forwarded_client_ip.
        self._clients: dict[tuple[str | None, Forwarding], str | None] = {}

    def _add_entry(self, entry: object, literals: set[str], networks: list[_IPNetwork]) -> None:
        if not isinstance(entry, str):
            raise ValueError(
                f"trusted_proxies entry {entry!r} is not a string; "
                f"use an IP or CIDR, {_ENTRY_EXAMPLES}"
            )
        text = entry.strip()
        if text == "*":
            self._trust_all = True
            return
        if not text:
            raise ValueError(f"empty trusted_proxies entry; use an IP or CIDR, {_ENTRY_EXAMPLES}")
        if "/" in text:
            try:
                network = ipaddress.ip_network(text, strict=True)
            except ValueError:
                try:
                    loose = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    raise ValueError(
                        f"trusted_proxies entry {entry!r} is not a valid CIDR network, "
                        f"{_ENTRY_EXAMPLES}"
                    ) from None
                # "10.0.0.1/8" is either a typo for /32 or for 10.0.0.0/8; guessing
                # wrong would trust far more (or less) than intended.
                raise ValueError(
                    f"trusted_proxies entry {entry!r} has host bits set; "
                    f"did you mean {str(loose)!r}?"
                ) from None
            if isinstance(network, ipaddress.IPv6Network):
                network = _ipv4_network_of_mapped(network)
            if network.prefixlen == network.max_prefixlen:
                literals.add(str(network.network_address))
            else:
                networks.append(network)
            return
        address = _normalise_ip(text) if len(text) <= _MAX_ADDRESS_CHARS else None
        if address is None:
            raise ValueError(
                f"trusted_proxies entry {entry!r} is not an IP address or CIDR network "
                f"(host names are not resolved), {_ENTRY_EXAMPLES}"
            )
        literals.add(address)

    @property
    def header(self) -> ForwardedHeader:
        """The forwarding header read (``"auto"``: see the class docstring)."""
        return self._header

    @property
    def hop_count(self) -> int:
        """N in hop-count mode, else 0."""
        return self._hops

    @property
    def trusts_all(self) -> bool:
        return self._trust_all

    @property
    def trusts_every_address(self) -> bool:
        """``"*"``, or a network that holds every address of a family (``"0.0.0.0/0"``)."""
        return self._everyone

    def __bool__(self) -> bool:
        """True when any forwarding header can ever be believed."""
        return self._enabled

    def __contains__(self, host: object) -> bool:
        """Is ``host`` (an IP address string) a trusted proxy by address?

        Hop-count mode trusts by position, not address, so nothing is "in" it.
        """
        if self._trust_all:
            return True
        if not isinstance(host, str):
            return False
        if host in self._literals:
            return True
        if len(host) > _MAX_ADDRESS_CHARS or not (self._networks or self._literals):
            return False
        return self._contains(host)

    def _lookup(self, host: str) -> bool:
        address = _normalise_ip(host.strip())
        if address is None:
            return False
        if address in self._literals:
            return True
        if not self._networks:
            return False
        if ":" not in address:  # IPv4, canonical: see _ipv4_networks
            value = int.from_bytes(socket.inet_aton(address), "big")
            return any(value & mask == start for start, mask in self._ipv4_networks)
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self._networks)

    def _peer_is_proxy(self, peer_address: str | None) -> bool:
        if not self._enabled:
            return False
        if self._trust_all or self._hops:
            return True
        return peer_address is not None and peer_address in self

    def peer_is_proxy(self, peer: str | None) -> bool:
        """Whether the socket peer as the server reported it (not normalised) is a proxy."""
        peers = self._peers
        found = peers.get(peer)
        if found is None:
            found = self._peer_is_proxy(_address(peer))
            if len(peers) >= 1024:
                # Directly exposed apps see every visitor as a peer: stay bounded.
                peers.clear()
            peers[peer] = found
        return found

    def __repr__(self) -> str:
        if self._hops:
            what: object = self._hops
        elif self._trust_all:
            what = "*"
        else:
            what = sorted(self._literals) + [str(n) for n in self._networks]
        return f"TrustedProxies({what!r}, header={self.header!r})"


def _forwarded_elements(header: str) -> list[dict[str, str]] | None:
    """Parse RFC 7239 ``Forwarded`` into one dict per element (names lowercased).

    Returns None when the header is malformed. The whole header is refused rather
    than repaired: with a client-sent prefix ending in an open quote (``by="``), a
    lenient parser lets that quote swallow the element the proxy appended, and the
    client's own ``for=`` then looks like the right-most hop. A strict grammar makes
    that impossible, because the proxy's closing text can never be well-formed there.
    """
    if len(header) > _MAX_FORWARDED_CHARS or not _FORWARDED_VALID.fullmatch(header):
        return None
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    # Only valid text gets here, so the tokens found are exactly the header's pairs
    # and element separators, in order (";" needs no token: pairs just accumulate).
    for name, value, comma in _FORWARDED_TOKENS.findall(header):
        if comma:
            if current:  # empty list elements (", ,") are allowed and mean nothing
                elements.append(current)
            current = {}
            continue
        key = name.lower()
        if key in current:
            # RFC 7239 forbids repeats; which one would be "the" value is anyone's guess.
            return None
        if value.startswith('"'):
            value = value[1:-1]
            if "\\" in value:
                value = _QUOTED_PAIR.sub(r"\1", value)
        current[key] = value
    if current:
        elements.append(current)
    return elements


def _forwarded_param(elements: list[dict[str, str]], name: str) -> list[str | None] | None:
    """Per-element values of ``name``; None when no element carries it at all."""
    values = [element.get(name) for element in elements]
    return values if any(value is not None for value in values) else None


def _list_header(value: str, limit: int) -> list[str | None]:
    # rsplit with a bound keeps the cost independent of a padded, forged left part:
    # only the right-most entries, which trusted proxies appended, are ever needed.
    return [item for item in value.rsplit(",", limit) if item.strip()]


def _hop_chain(
    trusted: TrustedProxies,
    forwarded: str | None,
    x_forwarded_for: str | None,
    x_real_ip: str | None,
    mode: ForwardedHeader | None = None,
) -> list[str | None] | None:
    """The forwarding chain (left = farthest), or None if a present header is unusable.
    ``mode``: the header to read (``trusted.header`` when None)."""
    mode = trusted._header if mode is None else mode
    limit = max(_MAX_HOPS, trusted.hop_count)
    if mode in ("auto", "forwarded") and forwarded and forwarded.strip():
        elements = _forwarded_elements(forwarded)
        if elements is None:
            # Do not fall back to X-Forwarded-For: that would let a client choose
            # which header we believe just by breaking this one.
            return None
        hops = _forwarded_param(elements, "for")
        if hops is not None or mode == "forwarded":
            return hops or []
    if mode in ("auto", "x-forwarded-for") and x_forwarded_for and x_forwarded_for.strip():
        return _list_header(x_forwarded_for, limit)
    if mode in ("auto", "x-real-ip") and x_real_ip and x_real_ip.strip():
        return [x_real_ip]
    return []


def _auto_chains(
    trusted: TrustedProxies,
    forwarded: str | None,
    x_forwarded_for: str | None,
    x_real_ip: str | None,
) -> dict[ForwardedHeader, list[str | None] | None]:
    """Each forwarding header that names a client address, in "auto"'s order of
    preference, with its chain (each header read, and a Forwarded parsed, once)."""
    chains: dict[ForwardedHeader, list[str | None] | None] = {}
    headers: tuple[tuple[ForwardedHeader, str | None], ...] = (
        ("forwarded", forwarded),
        ("x-forwarded-for", x_forwarded_for),
        ("x-real-ip", x_real_ip),
    )
    for name, value in headers:
        if value and value.strip():
            chain = _hop_chain(trusted, forwarded, x_forwarded_for, x_real_ip, name)
            # A Forwarded without for= names no address (a malformed one, None, counts:
            # _hop_chain refuses the whole request for it).
            if name != "forwarded" or chain != []:
                chains[name] = chain
    return chains


_disagreement_warned = False


def _warn_disagreement(names: list[ForwardedHeader], trusted: TrustedProxies) -> None:
    global _disagreement_warned
    if _disagreement_warned:
        return
    _disagreement_warned = True
    from ._log import logger

    if trusted.trusts_every_address:
        # Every hop trusted: a chain's left-most entry is believed, and a proxy that
        # appends leaves that one to the client. Pinning such a header would hand it over.
        advice = (
            "list your proxies' addresses in trusted_proxies= instead of '*' (or a network "
            "holding every address, such as '0.0.0.0/0') and set "
            "trusted_proxy_header= to the one header your proxy writes, or, keeping '*', "
            "'x-real-ip' if your proxy sets it from the address it sees (nginx's X-Real-IP "
            "$remote_addr); not a header it appends to, whose left-most entry is the "
            "client's to write"
        )
    else:
        advice = (
            "set trusted_proxy_header= to the one header your proxy writes ('x-forwarded-for' "
            "for nginx's $proxy_add_x_forwarded_for, AWS ALB, HAProxy option forwardfor; "
            "'x-real-ip' for nginx's X-Real-IP $remote_addr)"
        )
    logger.warning(
        "a request from a trusted proxy carried %s, which name different client addresses: "
        "a proxy writes one of them and passes the others through from the client, so with "
        "trusted_proxy_header='auto' the client could choose the IP recorded. Such requests "
        "are recorded without an IP; %s.",
        ", ".join(names),
        advice,
    )


def _agreeing_chain(
    trusted: TrustedProxies, chains: list[list[str | None] | None]
) -> list[str | None] | None:
    """The longest of ``chains`` when every other one names the same addresses as its
    right end, else None. nginx behind a load balancer or CDN writes X-Real-IP
    $remote_addr (the balancer) and appends that same address to X-Forwarded-For: the
    shorter header is the longer one's last hops. A client cannot choose with this: the
    walk of the longer chain leaves the shorter one's hops only past addresses that are
    all trusted, i.e. where the shorter one (written by a proxy) ends in a trusted peer,
    which must itself have appended to the longer header. Not under "*", where every hop
    is trusted and the walk would always go on into what the client wrote (nor under a
    network that holds every address, "0.0.0.0/0" or "::/0", for the same reason)."""
    if trusted.trusts_every_address or any(not chain for chain in chains):
        return None
    longest = max(chains, key=len)  # type: ignore[arg-type]
    assert longest is not None
    for chain in chains:
        assert chain is not None
        if chain is longest:
            continue
        for hop, same in zip(chain, longest[len(longest) - len(chain) :], strict=True):
            address = _hop_address(hop)
            if address is None or address != _hop_address(same):
                return None
    return longest


def _walk(trusted: TrustedProxies, chain: list[str | None] | None) -> str | None:
    """The client's address in ``chain`` (see :func:`client_ip`), or None."""
    if not chain:
        # A trusted proxy that says nothing is misconfigured or probing us itself;
        # its own address would attribute every visitor to the proxy.
        return None

    hops = trusted.hop_count
    if hops:
        # Each proxy appends the address it saw, so with exactly N proxies the Nth
        # entry from the right was written by the outermost one: the client.
        # Anything further left is client-supplied and unverifiable.
        return _hop_address(chain[-hops]) if len(chain) >= hops else None

    # Walk from the right: the right-most entries were appended by proxies we trust,
    # the left-most by whoever connected first, i.e. possibly the client forging.
    address: str | None = None
    for walked, raw in enumerate(reversed(chain)):
        if walked == _MAX_HOPS:
            return None
        address = _hop_address(raw)
        if address is None:
            # "unknown", an obfuscated id or junk from a proxy we trust: nothing to
            # its left can be vouched for, and skipping it would trust the client.
            return None
        if address not in trusted:
            return address
    # Every hop is a trusted proxy: the request originated inside the trusted network.
    return address


def client_ip(
    peer: str | None,
    *,
    forwarded: str | None,
    x_forwarded_for: str | None,
    x_real_ip: str | None,
    trusted: TrustedProxies,
) -> str | None:
    """The visitor's IP address as one canonical string, or None.

    ``peer`` is the socket peer (ASGI ``scope["client"][0]``, WSGI ``REMOTE_ADDR``).
    The result is always something ``ipaddress.ip_address`` accepts, never a header
    fragment. It is a trusted proxy's address only when every hop is one (a request
    that started inside the trusted network); the left-most hop is the origin then.
    """
    peer_address = _address(peer)
    if not trusted._peer_is_proxy(peer_address):
        # Anyone can send forwarding headers; only a proxy we trust may vouch for them.
        return peer_address

    if trusted._header == "auto" and (
        (forwarded is not None) + (x_forwarded_for is not None) + (x_real_ip is not None) > 1
    ):
        by_header = _auto_chains(trusted, forwarded, x_forwarded_for, x_real_ip)
        if len(by_header) > 1:
            # A proxy writes one of these and passes the others through as the client
            # sent them (nginx, HAProxy, AWS ALB, Traefik, Caddy: none strips Forwarded):
            # believing the first present would let the client choose its address. Only
            # an answer all of them agree on is taken.
            chains = list(by_header.values())
            answers = {_walk(trusted, chain) for chain in chains}
            if len(answers) == 1:
                return answers.pop()
            agreeing = _agreeing_chain(trusted, chains)
            if agreeing is not None:
                return _walk(trusted, agreeing)
            _warn_disagreement(list(by_header), trusted)
            return None

    return _walk(trusted, _hop_chain(trusted, forwarded, x_forwarded_for, x_real_ip))


#: ``(Forwarded, X-Forwarded-For, X-Real-IP)`` as a request carried them.
Forwarding = tuple[str | None, str | None, str | None]

# One visitor's page views and chats come with the same forwarding headers, and the walk
# of them costs the worker ~5 us an event (both X-Forwarded-For and X-Real-IP, as nginx
# writes them, are walked). Bounded in entries, and in key size: a header longer than
# any real chain of proxies (a padded, forged one) is walked every time instead.
_CACHED_CLIENTS: Final = 1024
_MAX_CACHED_FORWARDING: Final = 512
_UNSEEN: Final = object()


def forwarded_client_ip(
    peer: str | None, forwarding: Forwarding, trusted: TrustedProxies
) -> str | None:
    """:func:`client_ip` of ``forwarding``, remembered per distinct peer and headers (the
    answer depends on nothing else: ``trusted`` does not change once built)."""
    forwarded, x_forwarded_for, x_real_ip = forwarding
    if not (
        (peer is None or len(peer) <= _MAX_ADDRESS_CHARS)
        and (forwarded is None or len(forwarded) <= _MAX_CACHED_FORWARDING)
        and (x_forwarded_for is None or len(x_forwarded_for) <= _MAX_CACHED_FORWARDING)
        and (x_real_ip is None or len(x_real_ip) <= _MAX_CACHED_FORWARDING)
    ):
        return client_ip(
            peer,
            forwarded=forwarded,
            x_forwarded_for=x_forwarded_for,
            x_real_ip=x_real_ip,
            trusted=trusted,
        )
    clients = trusted._clients
    key = (peer, forwarding)
    found = clients.get(key, _UNSEEN)
    if found is _UNSEEN:
        found = client_ip(
            peer,
            forwarded=forwarded,
            x_forwarded_for=x_forwarded_for,
            x_real_ip=x_real_ip,
            trusted=trusted,
        )
        if len(clients) >= _CACHED_CLIENTS:
            clients.clear()
        clients[key] = found
    return found  # type: ignore[return-value]


# WebSocket upgrades arrive as ws/wss; the page the visitor saw was http/https.
_PAGE_SCHEMES: Final = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


def client_scheme(
    scheme: str,
    *,
    forwarded: str | None,
    x_forwarded_proto: str | None,
    peer: str | None,
    trusted: TrustedProxies,
    x_forwarded_for: str | None = None,
    x_real_ip: str | None = None,
) -> str:
    """``"http"``/``"https"`` as the client used it, or ``scheme`` unchanged.

    Read from the header :func:`client_ip` reads the address from: the ``proto=`` of the
    visitor's own ``Forwarded`` element (see :func:`_visitor_proto`), or
    ``X-Forwarded-Proto``'s right-most value (the one our nearest proxy wrote) beside
    ``X-Forwarded-For`` / ``X-Real-IP``. Under ``"auto"`` a ``Forwarded`` that names no
    client (no ``for=``) is not read; when ``Forwarded`` and one of the others both name
    one, a client wrote one of them, and ``https`` is taken if either says so.
    """
    return forwarded_scheme(
        scheme,
        forwarded,
        x_forwarded_proto,
        peer,
        trusted,
        names_address(x_forwarded_for) or names_address(x_real_ip),
    )


def names_address(value: str | bytes | None) -> bool:
    """Whether an ``X-Forwarded-For`` / ``X-Real-IP`` value counts as present for "auto"'s
    choice of header (as in :func:`_auto_chains`: a blank one does not)."""
    if not value:
        return False
    return not value.isspace()


def _visitor_proto(elements: list[dict[str, str]], trusted: TrustedProxies) -> str | None:
    """``proto`` of the ``Forwarded`` element that describes the visitor's own hop (where
    :func:`client_ip`'s walk from the right stops: the first ``for`` we do not trust, or
    the N-th element with a hop count), as the proxy that took the visitor's connection
    wrote it: behind a TLS edge and an internal http hop, ``https``, not the inner
    ``http``. When that element states none, the outermost one stated by our proxies.
    Never read from an element left of the visitor's: the client may have written it."""
    hops = trusted.hop_count
    outermost: str | None = None
    for walked, element in enumerate(reversed(elements), start=1):
        proto = element.get("proto")
        if proto is not None:
            outermost = proto
        if hops:
            if walked >= hops:
                return outermost
        else:
            address = _hop_address(element.get("for"))
            if address is None or address not in trusted:
                return outermost
    return outermost


def _page_scheme(value: str | None) -> str | None:
    """``value`` (a proxy's proto) as ``"http"``/``"https"``, or None if it is neither."""
    if value is None or len(value) > 16:
        return None
    known = _PAGE_SCHEMES.get(value)
    if known is not None:
        return known  # what proxies send: already bare and lower case
    return _PAGE_SCHEMES.get(value.strip().strip('"').strip().lower())


def forwarded_scheme(
    scheme: str,
    forwarded: str | None,
    x_forwarded_proto: str | None,
    peer: str | None,
    trusted: TrustedProxies,
    addressed: bool = False,
) -> str:
    """:func:`client_scheme` with positional arguments, for the request path. ``addressed``:
    ``X-Forwarded-For`` or ``X-Real-IP`` names a client (see :func:`names_address`); only
    asked when a ``Forwarded`` is there."""
    if not forwarded and not x_forwarded_proto:
        return scheme  # the common case for direct traffic, decided without the peer
    if not trusted.peer_is_proxy(peer):
        return scheme
    mode = trusted._header
    if mode in ("auto", "forwarded") and forwarded and not forwarded.isspace():
        elements = _forwarded_elements(forwarded)
        if mode == "forwarded":
            if elements is None:
                return scheme
            return _page_scheme(_visitor_proto(elements, trusted)) or scheme
        # "auto": the scheme follows the header the client IP is read from, as a proxy
        # writes its proto beside its address and passes the other headers through from
        # the client. A Forwarded without for= names no client (client_ip reads another
        # header then), so its proto= is the client's to write: nginx passes a client's
        # "Forwarded: proto=http" on beside the X-Forwarded-Proto it sets.
        if elements is None or _forwarded_param(elements, "for") is not None:
            stated = None if elements is None else _visitor_proto(elements, trusted)
            if not addressed:
                # Forwarded alone names the client: its proxy writes Forwarded, and its
                # proto= says the scheme. Without one (HAProxy's "set-header Forwarded
                # for=%[src]" beside its X-Forwarded-Proto), the X-Forwarded-Proto may be
                # the proxy's or the client's: its https is taken, as when both name the
                # client (a forged one adds Secure, never takes it off).
                if stated is not None or elements is None:
                    return _page_scheme(stated) or scheme
                if _page_scheme(_nearest_proto(x_forwarded_proto)) == "https":
                    return "https"
                return scheme
            # Both name a client: a proxy wrote one, the client the other, and nothing
            # says which. https if either says so: a forged value can then only add
            # Secure to the cookie (which a browser on plain http drops), never take it
            # off the cookie of a visitor who came over https.
            ours = _page_scheme(stated)
            theirs = _page_scheme(_nearest_proto(x_forwarded_proto))
            if "https" in (ours, theirs):
                return "https"
            return ours or theirs or scheme
    if mode == "forwarded" or not x_forwarded_proto:
        return scheme
    return _page_scheme(_nearest_proto(x_forwarded_proto)) or scheme


def _nearest_proto(x_forwarded_proto: str | None) -> str | None:
    """The right-most value, the one our nearest proxy surely wrote: unlike Forwarded, no
    address says which hop wrote the others (a proxy may replace the header rather than
    append to it, and the client's own value is then next to ours)."""
    return None if x_forwarded_proto is None else x_forwarded_proto.rpartition(",")[2]


# ---------------------------------------------------------------------------
# Language
# ---------------------------------------------------------------------------

# Browsers send well under 200 chars; beyond 1,000 it is junk or an attack, and the
# cap bounds both parse time and the size of keys pinned in the cache.
_MAX_ACCEPT_LANGUAGE: Final = 1000
# Longer tags are extension soup; the API rejects long strings anyway.
_MAX_LANGUAGE_TAG: Final = 64
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")
_Q_PARAM = re.compile(r"[qQ][ \t]*=[ \t]*(.*)", re.DOTALL)
_Q_VALUE = re.compile(r"[0-9]{1,5}(?:\.[0-9]{0,10})?|\.[0-9]{1,10}")


def _normalise_language_tag(tag: str) -> str:
    subtags = tag.split("-")
    out = [subtags[0].lower()]
    # After a singleton ("x-", "u-", or a primary "i"/"x") subtags are private or
    # extension data, where the region/script casing conventions do not apply.
    opaque = len(subtags[0]) == 1
    for subtag in subtags[1:]:
        if opaque or len(subtag) == 1:
            opaque = True
            out.append(subtag.lower())
        elif len(subtag) == 4 and subtag.isalpha():
            out.append(subtag.capitalize())
        elif (len(subtag) == 2 and subtag.isalpha()) or (len(subtag) == 3 and subtag.isdigit()):
            out.append(subtag.upper())
        else:
            out.append(subtag.lower())
    return "-".join(out)


def _language_weight(params: list[str]) -> float | None:
    """q of one Accept-Language entry; None when the entry is garbage."""
    weight = 1.0
    seen = False
    for param in params:
        param = param.strip()
        if not param:
            continue
        match = _Q_PARAM.fullmatch(param)
        if match is None:
            continue  # unknown parameters are ignored, as for any HTTP header
        value = match.group(1).strip()
        # Not float(): it would accept "nan", "inf", "1e0" and "1_0".
        if seen or not _Q_VALUE.fullmatch(value):
            return None
        weight = float(value)
        if weight > 1.0:
            return None
        seen = True
    return weight


@functools.lru_cache(maxsize=1024)
def _best_language(header: str) -> str | None:
    best: str | None = None
    best_weight = 0.0
    for entry in header.split(","):
        tag, *params = entry.split(";")
        tag = tag.strip()
        if not tag or tag == "*" or len(tag) > _MAX_LANGUAGE_TAG:
            continue
        if not _LANGUAGE_TAG.fullmatch(tag):
            continue
        weight = _language_weight(params)
        # Strictly greater: ties keep header order, and q=0 means "not acceptable".
        if weight is not None and weight > best_weight:
            best, best_weight = tag, weight
    return _normalise_language_tag(best) if best is not None else None


def best_language(accept_language: str | None) -> str | None:
    """Most preferred language tag of an Accept-Language header, BCP 47-cased."""
    if not accept_language:
        return None
    header = accept_language
    if len(header) > _MAX_ACCEPT_LANGUAGE:
        # Cut before the cache so a huge header neither costs time nor pins memory,
        # and drop the entry the cut went through rather than read a truncated tag.
        header = header[:_MAX_ACCEPT_LANGUAGE]
        header = header[: max(header.rfind(","), 0)]
    return _best_language(header)


# ---------------------------------------------------------------------------
# Probes and scripts
# ---------------------------------------------------------------------------

# Case-insensitive substrings. Each was chosen to be distinctive: it must never
# occur in a real browser's user agent, or that visitor would vanish from the data.
# Crawlers (Googlebot, bingbot...) are deliberately absent: bots are a different
# fact (``classify_user_agent``), probes are simply not page views at all.
DEFAULT_NON_BROWSER_AGENTS: tuple[str, ...] = (
    # Load balancers, orchestrators and cloud health checks.
    "kube-probe",  # kube-probe/1.29
    "ELB-HealthChecker",  # ELB-HealthChecker/2.0 (AWS ALB/CLB)
    "GoogleHC",  # GoogleHC/1.0 (Google Cloud load balancing)
    "GoogleStackdriverMonitoring",  # GoogleStackdriverMonitoring-UptimeChecks(...)
    "Amazon-Route53-Health-Check-Service",
    "Azure Traffic Manager",  # Azure Traffic Manager Endpoint Monitor
    "AlwaysOn",  # Azure App Service keep-alive
    "ReadyForRequest",  # Azure App Service warm-up: ReadyForRequest/1.0 (HealthCheck)
    "Envoy/HC",
    "HAProxy",
    "Varnish",
    "nginx",
    "HealthCheck",  # HealthCheck/1.0, HealthChecker, ...
    "Health-Check",
    "Health Check",  # Consul Health Check
    # Monitoring agents and uptime services.
    "Blackbox Exporter",  # Blackbox Exporter/0.25.0 (Prometheus)
    "Prometheus",
    "check_http",  # check_http/v2.3.3 (monitoring-plugins; Nagios, Icinga)
    "Nagios",
    "Zabbix",
    "monit/",
    "UptimeRobot",  # UptimeRobot/2.0
    "Pingdom",  # Pingdom.com_bot_version_1.4
    "StatusCake",
    "Site24x7",
    "Datadog",  # Datadog/Synthetics, DatadogSynthetics, Datadog Agent
    "NewRelicPinger",
    "Better Uptime",  # Better Uptime Bot
    "BetterStack",
    "Better Stack",
    "Uptime-Kuma",  # Uptime-Kuma/1.23
    "Checkly",
    "Freshping",
    "HetrixTools",
    "Catchpoint",
    "RuxitSynthetic",  # Dynatrace synthetic monitors
    # Browsers without a screen: no one there to chat. Puppeteer, Playwright and Selenium
    # in headless mode (an app's own end-to-end tests), browser-based uptime checks,
    # prerendering services, scrapers; and Lighthouse / PageSpeed Insights runs.
    "HeadlessChrome",  # ... (KHTML, like Gecko) HeadlessChrome/126.0.0.0 Safari/537.36
    "Chrome-Lighthouse",  # ... Chrome/120.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse
    "Cypress/",  # ... Cypress/13.6.0 Chrome/118.0.5993.159 Electron/27.1.3 (end-to-end tests)
    # Link previews, crawlers and AI agents that user-agents takes for browsers (a Safari
    # or Chrome token in theirs): a shared link's preview, or a model reading the page for
    # someone, is no chance to chat.
    "facebookexternalhit",  # iMessage's preview: Safari/601.2.4 facebookexternalhit/1.1 ...
    "Facebot",
    "Twitterbot",
    "SkypeUriPreview",
    "Teams-LinkPreview",
    "Applebot",  # ... Version/8.0.2 Safari/600.2.5 (Applebot/0.1; +http://www.apple.com/...)
    "Google-PageRenderer",
    "Google-Read-Aloud",
    "ChatGPT-User",
    "Claude-User",
    "Perplexity-User",
    "vkShare",
    "ViberUrlDownloader",  # Viber's link preview; its in-app browser says Viber/ (people)
    "Iframely",
    "Embedly",
    # HTTP clients and scripts. Slashes keep short names from matching inside words.
    "curl/",
    "Wget/",
    "HTTPie/",
    "python-httpx",
    "python-requests",
    "Python-urllib",
    "aiohttp",
    "Go-http-client",
    "okhttp/",
    "Java/",  # Java/17.0.2 (HttpURLConnection), Apache-HttpClient/... (Java/...)
    "Apache-HttpClient",
    "node-fetch",
    "axios/",
    "undici",  # Node.js fetch before 18.18/20.x; newer sends exactly "node"
    "libwww-perl",
    "PostmanRuntime",
    "insomnia/",
    "WindowsPowerShell",
    "dart:io",  # Dart/3.3 (dart:io)
    "GuzzleHttp",
    "Faraday v",
)

# Matching (and parsing) looks at this much of a user agent at most. Real ones are
# 100-300 chars; the cap bounds regex time and lru_cache key size for a forged one.
_MAX_USER_AGENT: Final = 512
# Also bounds the trie's recursion depth.
_MAX_AGENT_TOKEN: Final = 200


def compile_agent_matcher(agents: Iterable[str]) -> Callable[[str], bool]:
    """Build ``is_non_browser(user_agent) -> bool`` for case-insensitive substrings.

    An empty user agent counts as a probe: every browser sends one.
    """
    if isinstance(agents, (str, bytes, bytearray)):
        raise ValueError(
            f"non_browser_agents must be a list of substrings such as [{agents!r}], "
            "not a single string"
        )
    try:
        items = list(agents)
    except TypeError:
        raise ValueError(
            f"non_browser_agents must be a list of substrings, got {type(agents).__name__}"
        ) from None
    unique: set[str] = set()
    for position, agent in enumerate(items):
        if not isinstance(agent, str):
            raise ValueError(f"non_browser_agents[{position}] must be a string, got {agent!r}")
        text = agent.strip()
        if not text:
            raise ValueError(
                f"non_browser_agents[{position}] is empty; it would match every user agent"
            )
        if len(text) > _MAX_AGENT_TOKEN:
            raise ValueError(
                f"non_browser_agents[{position}] is {len(text)} chars long; use a short, "
                f"distinctive token (at most {_MAX_AGENT_TOKEN} chars) such as 'kube-probe'"
            )
        unique.add(text.lower())

    if not unique:

        def is_empty(user_agent: str) -> bool:
            return not user_agent or user_agent.isspace()

        return is_empty

    # Lowercasing the agent and the pattern instead of re.IGNORECASE, and factoring
    # the alternation into a trie, make a search ~20x cheaper: sre tries every branch
    # at every position, and case-insensitive branches cannot be skipped by first char.
    search = re.compile(_trie_pattern(sorted(unique))).search

    @functools.lru_cache(maxsize=4096)
    def matches(user_agent: str) -> bool:
        return search(user_agent.lower()) is not None

    def is_non_browser(user_agent: str) -> bool:
        if not user_agent or user_agent.isspace():
            return True
        return matches(user_agent[:_MAX_USER_AGENT])

    return is_non_browser


def _trie_pattern(words: list[str]) -> str:
    """One regex matching any of ``words``, with shared prefixes factored out."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def alternation(node: dict[str, Any]) -> str:
        if "" in node:
            # A shorter word ends here; for a substring search the longer ones add nothing.
            return ""
        branches = [re.escape(char) + alternation(child) for char, child in sorted(node.items())]
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return alternation(trie)


# ---------------------------------------------------------------------------
# URL hygiene
# ---------------------------------------------------------------------------

# URLs beyond ~2 KB are state or tracking blobs rather than page identity; 2,048 is
# the de-facto interoperable URL limit (old IE, the sitemaps protocol, many CDNs),
# so clamping there loses nothing worth reporting and bounds payload and work.
MAX_URL_LENGTH: Final = 2048

# Compared after percent-decoding, lowercasing and dropping everything but [a-z0-9],
# so api_key, api-key, apiKey and API%5FKEY all read "apikey".
_SECRET_PARAM_NAMES: Final = frozenset(
    {
        "auth",
        "authorization",
        "authcode",
        "code",  # OAuth authorization code
        "key",
        "pass",
        "pw",
        "pwd",
        "pin",
        "otp",
        "jwt",
        "sig",
        "hmac",
        "sid",
        "session",
        "ticket",  # CAS single sign-on
        "ssn",
        "cvv",
        "cvc",
    }
)
_SECRET_PARAM_PARTS: Final = (
    "token",  # access_token, id_token, refresh_token, X-Amz-Security-Token
    "password",
    "passwd",
    "passphrase",
    "secret",  # client_secret
    "apikey",
    "signature",  # X-Amz-Signature, X-Goog-Signature
    "credential",  # X-Amz-Credential, credentials
    "sessionid",  # jsessionid
    "sessid",  # PHPSESSID
    "privatekey",
    "verifier",  # oauth_verifier, code_verifier (PKCE)
    "assertion",  # client_assertion
    "saml",  # SAMLRequest, SAMLResponse
)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
# Query names are short; longer ones are not worth a cache slot.
_MAX_CACHED_PARAM_NAME: Final = 128


def _secret_name_uncached(name: str) -> bool:
    compact = _NON_ALNUM.sub("", unquote_plus(name, errors="replace").lower())
    return (
        compact in _SECRET_PARAM_NAMES
        # api_key, access_key, reset_key, license_key...
        or compact.endswith("key")
        or any(part in compact for part in _SECRET_PARAM_PARTS)
    )


_secret_name_cached = functools.lru_cache(maxsize=1024)(_secret_name_uncached)


def _is_secret_param(param: str) -> bool:
    if ";" in param:
        # Some servers split parameters on ";" too (a=1;access_token=...).
        return any(_is_secret_name(part.partition("=")[0]) for part in param.split(";"))
    return _is_secret_name(param.partition("=")[0])


def _is_secret_name(name: str) -> bool:
    if len(name) > _MAX_CACHED_PARAM_NAME:
        return _secret_name_uncached(name)
    return _secret_name_cached(name)


# A path parameter (";jsessionid=..." of servlet URL rewriting) up to the next segment.
_PATH_PARAM = re.compile(r";([^/;=?#]*)=[^/;?#]*")


def redact_path(path: str) -> str:
    """``path`` without path parameters whose name looks secret, cut to :data:`MAX_URL_LENGTH`."""
    if ";" not in path:
        return path[:MAX_URL_LENGTH]
    # Cut first, as redact_query does: a path of thousands of parameters (a template chat
    # route takes any) once cost the worker ~26 ms an event. A cut leaves a secret's whole
    # name (and it goes) or no value of it.
    path = path[:MAX_URL_LENGTH]
    return _PATH_PARAM.sub(
        lambda match: "" if _is_secret_name(match.group(1)) else match.group(0), path
    )


def _cut_query(query: str, limit: int) -> str:
    """At most ``limit`` chars of ``query``, ending on a whole parameter."""
    if len(query) <= limit:
        return query
    cut = query[: limit + 1].rfind("&")
    return query[:cut] if cut > 0 else ""


def cut_text(text: str, limit: int) -> str:
    """At most ``limit`` chars, without leaving a torn %-escape at the end."""
    if len(text) <= limit:
        return text
    text = text[:limit]
    tail = text.rfind("%", len(text) - 2)
    return text[:tail] if tail != -1 else text


def redact_query(query: str) -> str:
    """``query`` without parameters whose name looks secret; the rest byte-for-byte.

    Kept parameters are not re-encoded: the server saw exactly these bytes, and
    re-encoding could turn the same page into several distinct URLs.
    """
    if not query:
        return ""
    # Cutting before redacting is safe: a secret's value follows its complete name,
    # so a cut either leaves the whole name (and the parameter is dropped) or no value.
    query = _cut_query(query, MAX_URL_LENGTH)
    params = query.split("&")
    kept = [param for param in params if not _is_secret_param(param) and not _hides_secret(param)]
    return query if len(kept) == len(params) else "&".join(kept)


_INNER_SEPARATOR = re.compile(r"[&;?]")


def _hides_secret(param: str) -> bool:
    """Whether a parameter's value holds a query of its own with a secret in it: a login
    page's ``next=/reset?token=...``, a redirect target with an ``api_key``."""
    value = param.partition("=")[2]
    for _ in range(2):  # escaped once, or twice by a chain of redirects
        if "%" not in value and "+" not in value:
            break
        value = unquote_plus(value, errors="replace")
    if "=" not in value:
        return False
    return any(
        _is_secret_name(part.partition("=")[0])
        for part in _INNER_SEPARATOR.split(value)
        if "=" in part
    )


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?"
)
_DEFAULT_PORTS: Final = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
# What may stay literal in a path: RFC 3986 pchar plus "/" and "%" so an already
# encoded (raw) path passes through unchanged; "?", "#", spaces and non-ASCII are
# escaped so a decoded path cannot start a query or fragment of its own.
_PATH_SAFE: Final = "/%!$&'()*+,;=:@~"
_MAX_HOST: Final = 255


def _clean_host(host: str, scheme: str) -> str | None:
    """Lowercased ``host[:port]`` without the scheme's default port, or None."""
    host = host.strip()
    if not host or len(host) > _MAX_HOST:
        return None
    match = _HOST.fullmatch(host)
    if match is None:
        # The Host header is client-supplied: "evil/x?y" must not reshape the URL.
        return None
    port = match.group(1)
    if port is not None and _DEFAULT_PORTS.get(scheme) == port:
        host = host[: match.start(1) - 1]
    return host.lower()


def _build_url(origin: str, path: str, query: str) -> str:
    path = quote(redact_path(path), safe=_PATH_SAFE, errors="replace")
    if not path.startswith("/"):
        path = "/" + path
    base = origin + path
    if len(base) >= MAX_URL_LENGTH:
        return cut_text(base, MAX_URL_LENGTH)
    # A fragment never reaches a server from a browser; if one appears it is junk.
    query = redact_query(query.partition("#")[0])
    query = _cut_query(query, MAX_URL_LENGTH - len(base) - 1)
    return f"{base}?{query}" if query else base


# Page URLs and referrers repeat from one visitor to the next (the same pages, the
# same search engine), and building one costs ~3 µs of the worker's time per event.
# Long ones are not worth a slot, and a cap keeps a flood of huge forged URLs from
# filling memory through the cache.
_MAX_CACHED_URL: Final = 512


def page_url(scheme: str, host: str | None, path: str, query: str) -> str:
    """``scheme://host/path?query`` with secrets removed and no fragment.

    ``path`` may be decoded (ASGI ``scope["path"]``) or raw; ``query`` is the raw
    query string. An unusable ``host`` or ``scheme`` gives just path and query.
    """
    if len(path) + len(query) + (len(host) if host else 0) <= _MAX_CACHED_URL:
        return _page_url_cached(scheme, host, path, query)
    return _page_url(scheme, host, path, query)


def _page_url(scheme: str, host: str | None, path: str, query: str) -> str:
    origin = ""
    if host is not None and _SCHEME.fullmatch(scheme):
        scheme = scheme.lower()
        clean = _clean_host(host, scheme)
        if clean is not None:
            origin = f"{scheme}://{clean}"
    return _build_url(origin, path, query)


_page_url_cached = functools.lru_cache(maxsize=1024)(_page_url)


def redact_url(url: str) -> str | None:
    """A Referer made safe to store: scheme, host, path, redacted query; or None."""
    if not url:
        return None
    if len(url) <= _MAX_CACHED_URL:
        return _redact_url_cached(url)
    return _redact_url(url)


def _redact_url(url: str) -> str | None:
    # The cut is before redaction for the reason given in redact_query.
    text = url.strip()[: 2 * MAX_URL_LENGTH]
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    if not _SCHEME.fullmatch(parts.scheme):
        return None
    scheme = parts.scheme.lower()
    # rpartition drops "user:password@": credentials never leave the request.
    host = _clean_host(parts.netloc.rpartition("@")[2], scheme)
    if host is None:
        return None
    return _build_url(f"{scheme}://{host}", parts.path, parts.query)


_redact_url_cached = functools.lru_cache(maxsize=1024)(_redact_url)


# ---------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------

# classify_user_agent and its cache (_classify) live in _device, which keeps user-agents'
# rules but swaps its slow parser for ua-parser 1.0's compiled resolvers (issue #7); they
# are imported above so that callers and tests of this module keep working.
