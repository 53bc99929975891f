"""Id extraction from cookies and JSON bodies agrees with the slow, obvious way."""

from __future__ import annotations

import json
import pickle
import re
import urllib.parse
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsight_middleware._conversation import (
    _LAZY_FIELDS,
    Conversation,
    clean_id,
    cookie_value,
    form_field,
    is_valid_id,
    json_field,
    pending_conversation,
    query_field,
)
from agentsight_middleware._facts import TrustedProxies

ids = st.one_of(
    st.from_regex(r"conv_[0-9a-f]{12}", fullmatch=True),
    st.text(max_size=20),
    st.integers(min_value=-(10**12), max_value=10**12),
)
json_values: Any = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "conversation_id", "b"]), children, max_size=3)
    ),
    max_leaves=8,
)


@given(
    before=st.dictionaries(st.sampled_from(["x", "y", "meta"]), json_values, max_size=3),
    value=ids,
    after=st.dictionaries(st.sampled_from(["z", "w"]), json_values, max_size=2),
    spaced=st.booleans(),
)
def test_json_field_matches_a_full_parse(
    before: dict[str, Any], value: Any, after: dict[str, Any], spaced: bool
) -> None:
    body = json.dumps(
        {**before, "conversation_id": value, **after},
        separators=(", ", ": ") if spaced else (",", ":"),
    ).encode()
    assert json_field(body, "conversation_id") == clean_id(json.loads(body)["conversation_id"])


@given(nested=json_values, top=st.one_of(st.none(), ids))
def test_json_field_never_takes_a_nested_key_over_the_top_level(nested: Any, top: Any) -> None:
    data: dict[str, Any] = {"meta": {"conversation_id": "conv_nested00000"}, "n": nested}
    if top is not None:
        data["conversation_id"] = top
    body = json.dumps(data).encode()
    assert json_field(body, "conversation_id") == (clean_id(top) if top is not None else None)


@given(
    value=st.from_regex(r"conv_[0-9a-f]{12}", fullmatch=True),
    others=st.lists(
        st.tuples(
            st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
            st.from_regex(r"[a-z0-9]{0,8}", fullmatch=True),
        ),
        max_size=4,
    ),
)
def test_cookie_value_matches_the_stdlib(value: str, others: list[tuple[str, str]]) -> None:
    name = "agentsight_conversation_id"
    pairs = [(k, v) for k, v in others if k != name] + [(name, value)]
    header = "; ".join(f"{k}={v}" for k, v in pairs)
    parsed = SimpleCookie()
    parsed.load(header)
    assert cookie_value(header, name) == parsed[name].value == value
    # A longer cookie name ending in ours is another cookie, whatever comes first.
    assert cookie_value(f"x{name}=conv_000000000000; {header}", name) == value


def _cookie_by_the_rules(header: str, name: str) -> str | None:
    """What cookie_value must answer, written as the rules read: the ";"-separated
    cookies in order, blanks before a name skipped, the first whose value (stripped,
    then unquoted) is an id."""
    for field in header.split(";"):
        field = field.lstrip(" \t")
        if field.startswith(name + "="):
            value = field[len(name) + 1 :].strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if is_valid_id(value):
                return value
    return None


@settings(max_examples=400)
@given(
    parts=st.lists(
        st.one_of(
            st.sampled_from(["agentsight_conversation_id=", "xagentsight_conversation_id=", "=",
                             ";", "; ", " ", "\t", '"', "\n", "\xa0", "\x1c", "\x85", "a=b"]),
            st.from_regex(r"conv_[0-9a-f]{1,12}", fullmatch=True),
            st.text(alphabet="ab=;\" \t_.:~-", max_size=6),
        ),
        max_size=12,
    )
)  # fmt: skip
def test_cookie_value_answers_as_the_rules_read(parts: list[str]) -> None:
    header = "".join(parts)
    name = "agentsight_conversation_id"
    assert cookie_value(header, name) == _cookie_by_the_rules(header, name)


def _query_by_parse_qsl(query: str, name: str) -> str | None:
    """What query_field must answer within its bounds: the first field of that name as
    parse_qsl reads them decides; a name clients send as it is, absent as such, is absent."""
    if name not in query and re.fullmatch(r"[A-Za-z0-9_.~-]+", name):
        return None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return clean_id(value)
    return None


_QUERY_NAMES = ["conversation_id", "chat[id]", "conversation id", "a+b", "a=b", "a&b", "ó", "a%b"]


@settings(max_examples=400)
@given(
    name=st.sampled_from(_QUERY_NAMES),
    parts=st.lists(
        st.one_of(
            st.sampled_from(["&", "=", "+", "%", "%5F", "%5B", "%5D", "%20", "%2B", "%3D", "%26",
                             "%C3%B3", "%zz", "conv_1", "conv_abc", " ", "x", "_", "id", ";"]),
            st.sampled_from(_QUERY_NAMES),
            st.sampled_from(_QUERY_NAMES).map(lambda n: quote(n, safe="") + "="),
        ),
        max_size=14,
    ),
)  # fmt: skip
def test_query_field_answers_as_parse_qsl_reads(name: str, parts: list[str]) -> None:
    query = "".join(parts)
    assert query_field(query, name) == _query_by_parse_qsl(query, name)
    assert form_field(query.encode(), name) == _query_by_parse_qsl(query, name)


def test_query_field_bounds() -> None:
    # The first 1,000 fields are read (as Django and Starlette read a form), no more.
    assert query_field("a=b&" * 999 + "conversation_id=conv_x", "conversation_id") == "conv_x"
    assert query_field("a=b&" * 1000 + "conversation_id=conv_x", "conversation_id") is None
    # Up to 64 keys with an escape are decoded, the id's among them ("chat[id]" arrives
    # as "chat%5Bid%5D").
    escaped = "x%5By%5D=c&"
    assert query_field(escaped * 63 + "chat%5Bid%5D=conv_x", "chat[id]") == "conv_x"
    assert query_field(escaped * 64 + "chat%5Bid%5D=conv_x", "chat[id]") is None
    # A key as it is is not counted, but the 65th escaped key before it ends the search.
    assert query_field(escaped * 64 + "chat[id]=conv_x", "chat[id]") == "conv_x"
    assert query_field(escaped * 65 + "chat[id]=conv_x", "chat[id]") is None
    # An id of 128 characters, each escaped: 384 to decode, the longest value decoded.
    longest = "a" * 128
    assert query_field("conversation_id=" + "%61" * 128, "conversation_id") == longest
    assert query_field("conversation_id=" + "%61" * 128 + "a", "conversation_id") is None


def test_query_field_decodes_only_keys_that_may_be_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # unquote costs ~0.3 us a "%": a 64 KB key of them cost 21 ms. A key decodes to the name
    # only with at most 3 characters and one "%" a byte of it, and no "%" of no "XX" unless
    # the name holds one; a longer key is not even scanned to its end.
    from agentsight_middleware import _conversation

    decoded: list[str] = []
    real = urllib.parse.unquote

    def unquote(text: str) -> str:
        decoded.append(text)
        return real(text)

    monkeypatch.setattr(_conversation, "unquote", unquote)
    name = "conversation_id"  # 15 bytes: keys of up to 45 characters
    for key in ["%" * 65_000, "%41" * 20_000, "a" * 30 + "%" * 16, "%zz", "a%5", "conversation%5",
                "x%" + "a" * 44]:  # fmt: skip
        decoded.clear()
        assert query_field(f"{key}=1&{name}=conv_x", name) == "conv_x"
        assert decoded == ["conv_x"], key
    # The longest key that may be the name, each byte escaped, is decoded and found.
    key = "".join(f"%{b:02X}" for b in name.encode())
    decoded.clear()
    assert query_field(f"{key}=conv_y&{name}=conv_x", name) == "conv_y"
    assert decoded == [key, "conv_y"]
    # A name with a "%" may come from a key with one of no "XX".
    assert query_field("a%b=conv_z", "a%b") == "conv_z"
    assert query_field("%C3%B3%=conv_z", "ó%") == "conv_z"


def _full() -> dict[str, Any]:
    return {
        "id": "conv_0123456789ab",
        "id_source": "cookie",
        "kind": "widget",
        "rule": "/pricing",
        "peer": "10.0.0.2",
        "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X)",
        "accept_language": "de-CH,de;q=0.9",
        "scheme": "https",
        "host": "shop.example",
        "path": "/pricing",
        "query": "utm_source=x&token=secret",
        "referrer": "https://search.example/?q=shoes",
        "customer_id": "cust_1",
        "extra_metadata": {"plan": "pro"},
        "forwarding": (None, "198.51.100.9", None),
        "trusted_proxies": TrustedProxies(["10.0.0.0/8"]),
    }


def test_a_pending_conversation_reads_its_facts_once_on_first_use() -> None:
    fields = _full()
    calls: list[object] = []

    def facts(raw: object) -> tuple[Any, ...]:
        calls.append(raw)
        return tuple(fields[name] for name in _LAZY_FIELDS)

    pending = pending_conversation(
        fields["id"], "cookie", "widget", "/pricing", "/pricing", "cust_1", {"plan": "pro"},
        facts, "raw request",
    )  # fmt: skip
    assert pending.id == "conv_0123456789ab"
    assert pending.path == "/pricing"
    assert calls == []  # nothing read for the eager fields
    assert pending.user_agent == fields["user_agent"]
    assert pending.client_ip == "198.51.100.9"
    assert (pending.language, pending.device, pending.scheme) == ("de-CH", "mobile", "https")
    assert pending.url == "https://shop.example/pricing?utm_source=x"  # the token dropped
    assert calls == ["raw request"]  # read once, then kept
    eager = Conversation(**fields)
    assert pending == eager
    assert pending.metadata() == eager.metadata()
    assert pending.metadata()["plan"] == "pro"
    direct = Conversation(**{**fields, "forwarding": None, "trusted_proxies": None})
    assert pickle.loads(pickle.dumps(direct)) == direct
    assert repr(pending) == repr(eager)
    assert repr(eager).startswith("Conversation(id='conv_0123456789ab', id_source='cookie'")


def test_a_conversation_with_metadata_is_hashable() -> None:
    # The metadata= option is a dict: hashing every field raised TypeError.
    fields = _full()
    assert isinstance(fields["extra_metadata"], dict)
    conversation = Conversation(**fields)
    same = Conversation(**fields)
    assert hash(conversation) == hash(same)
    assert {conversation, same} == {conversation}
    assert len({conversation, Conversation(**{**fields, "id": "conv_ba9876543210"})}) == 2


def test_a_conversation_is_read_only_and_not_a_sequence() -> None:
    fields = _full()
    conversation = Conversation(**fields)
    with pytest.raises(AttributeError):
        conversation.id = "conv_other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        conversation.anything = 1  # type: ignore[attr-defined]
    assert conversation != Conversation(**{**_full(), "query": ""})
    # Its fields are attributes: unpacking or serialising it as a sequence fails
    # loudly rather than handing out a layout that has changed before.
    with pytest.raises(TypeError):
        tuple(conversation)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        json.dumps(conversation)
    assert conversation.as_dict() == fields
    match conversation:
        case Conversation(cid, source, kind):
            assert (cid, source, kind) == ("conv_0123456789ab", "cookie", "widget")
        case _:
            pytest.fail("no match")


_tricky_text = st.text(alphabet='{}[]":,\\ abconversation_id0123.', max_size=14)
_json_keys = st.sampled_from(["conversation_id", "message", "meta"]) | _tricky_text


def _json_object(pairs: list[tuple[str, str]]) -> str:
    # Written by hand: a dict cannot hold the repeated keys a client may send.
    return "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in pairs) + "}"


_json_texts: Any = st.recursive(
    (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**15), max_value=10**15)
        | st.floats(allow_nan=False, allow_infinity=False)
        | _tricky_text
        | ids
    ).map(json.dumps),
    lambda children: (
        st.lists(children, max_size=3).map(lambda items: "[" + ", ".join(items) + "]")
        | st.lists(st.tuples(_json_keys, children), max_size=3).map(_json_object)
    ),
    max_leaves=10,
)


@settings(max_examples=1000, deadline=None)
@given(pairs=st.lists(st.tuples(_json_keys, _json_texts), max_size=5))
def test_json_field_reads_what_a_full_parse_reads(pairs: list[tuple[str, str]]) -> None:
    # Strings holding braces, brackets, quotes and the key itself, nested objects with
    # the key, repeated keys (the last wins), floats: the scan must never disagree.
    body = _json_object(pairs).encode()
    assert json_field(body, "conversation_id") == clean_id(json.loads(body).get("conversation_id"))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"message": "my regex ends in }", "meta": {"conversation_id": "conv_nested"}, '
            b'"conversation_id": "conv_top"}',
            "conv_top",
        ),
        (b'{"text": "bye :}", "meta": {"conversation_id": "conv_nested"}}', None),
        (b'{"q\\"conversation_id": "evil", "conversation_id": "real"}', "real"),
        (b'{"conversation_id": 12.5}', None),
        (b'{"conversation_id": 12}', "12"),
        (b'{"conversation_id": "first", "conversation_id": "last"}', "last"),
        (b'{"conversation_id": 0, "conversation_id": null}', None),
        (b'{"message": "hi", "conversation_id": "conv_plain"}', "conv_plain"),
    ],
    ids=[
        "brace-in-a-string-then-nested",
        "only-nested",
        "escaped-quote-in-a-key",
        "float",
        "integer",
        "repeated-key",
        "repeated-key-last-null",
        "plain",
    ],
)
def test_json_field_cases_from_review(body: bytes, expected: str | None) -> None:
    assert json_field(body, "conversation_id") == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"conversation_id": "conv_abc"',  # cut short
        b'{"conversation_id": "conv_abc"} x',  # trailing text
        b'x{"conversation_id": "conv_abc"}',  # leading text
        b'{"conversation_id": 007}',  # leading zeros
        b'{"conversation_id":\x0b"conv_abc"}',  # \v is no JSON blank
        b'{"conversation_id": -0}',  # json.loads reads 0
        b' \r\n{"conversation_id": 12 }\n',
        b'\xef\xbb\xbf{"conversation_id": "conv_abc"}',  # UTF-8 with a byte-order mark
    ],
)
def test_json_field_agrees_with_json_loads_on_framing_and_numbers(body: bytes) -> None:
    # The scan answered for bodies json.loads refuses (the app then had no id, and we
    # one), and misread -0.
    try:
        expected = clean_id(json.loads(body).get("conversation_id"))
    except ValueError:
        expected = None
    assert json_field(body, "conversation_id") == expected


@pytest.mark.parametrize(
    "encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
)
def test_json_field_reads_utf_16_and_32_bodies_as_json_loads_does(encoding: str) -> None:
    # Flask's get_json() and Starlette's request.json() read these; the key was looked
    # for as UTF-8 bytes only, and the app and AgentSight had two conversations.
    body = ' {"message": "hi", "conversation_id": "conv_abc123"}'.encode(encoding)
    assert json_field(body, "conversation_id") == "conv_abc123"


def test_fields_whose_names_clients_escape_are_found() -> None:
    # In a query or form "chat[id]" arrives as "chat%5Bid%5D", and json.dumps writes a
    # non-ASCII key as "\u00f3": the plain-text check before parsing found neither.
    assert query_field("chat%5Bconversation_id%5D=conv_abc123", "chat[conversation_id]") == (
        "conv_abc123"
    )
    assert form_field(b"conversation+id=conv_abc123", "conversation id") == "conv_abc123"
    body = json.dumps({"conversación": "conv_abc123"}).encode()
    assert b"\\u00f3" in body
    assert json_field(body, "conversación") == "conv_abc123"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # Another cookie's value (a page can write spaces into one) is not our cookie.
        ("msg=hello agentsight_conversation_id=conv_evil0000000", None),
        ("msg=hello agentsight_conversation_id=conv_evil0000000; "
         "agentsight_conversation_id=conv_good0000000", "conv_good0000000"),
        # An empty or broken first one (a longer path's) does not hide a good one.
        ("agentsight_conversation_id=; agentsight_conversation_id=conv_good0000000",
         "conv_good0000000"),
        ("agentsight_conversation_id=bad value; agentsight_conversation_id=conv_good0000000",
         "conv_good0000000"),
        ("a=1;agentsight_conversation_id=conv_tight000000", "conv_tight000000"),
        ("a=1; \t agentsight_conversation_id=conv_blanks00000", "conv_blanks00000"),
        ('agentsight_conversation_id="conv_quoted00000"', "conv_quoted00000"),
        ("agentsight_conversation_id=conv_a; agentsight_conversation_id=conv_b", "conv_a"),
    ],
)  # fmt: skip
def test_cookie_value_cases_from_review(header: str, expected: str | None) -> None:
    assert cookie_value(header, "agentsight_conversation_id") == expected


def test_json_field_skips_the_repeated_key_scan_on_large_bodies() -> None:
    # Looking for a second key costs ~18 us on 64 KB, on every such request: past 8 KiB
    # the first key wins (json.loads would take the last, for a body no client sends).
    small = b'{"conversation_id": "first", "pad": "x", "conversation_id": "last"}'
    pad = b"x" * 9000
    large = b'{"conversation_id": "first", "pad": "' + pad + b'", "conversation_id": "last"}'
    assert json_field(small, "conversation_id") == "last"
    assert json_field(large, "conversation_id") == "first"


@pytest.mark.parametrize(
    ("header", "forwarded", "forwarded_for", "real_ip"),
    [
        # A client pads its own Forwarded element: over 2,048 chars, the header is refused.
        ("auto", b"x=" + b"a" * 5000 + b", for=203.0.113.9", None, None),
        # Two X-Real-IP fields joined: one address is expected, a list is refused.
        ("x-real-ip", None, None, b"a" * 5000 + b", 203.0.113.9"),
        # A long X-Forwarded-For keeps its right end, where the proxies wrote: same answer.
        ("auto", None, b"6.6.6.6, " * 700 + b"203.0.113.9", None),
        # One hop padded past what is kept: a torn piece of it must not read as an address.
        ("auto", None, b"6.6.6.6" + b" " * 4100 + b"1.2.3.4", None),
        ("auto", None, b"6.6.6.6, 7.7.7.7" + b" " * 4100 + b"1.2.3.4", None),
    ],
    ids=[
        "forwarded", "x-real-ip", "x-forwarded-for", "padded-hop", "padded-last-hop",
    ],
)  # fmt: skip
def test_compacting_a_queued_event_never_changes_its_client_ip(
    header: str, forwarded: bytes | None, forwarded_for: bytes | None, real_ip: bytes | None
) -> None:
    # Events joining a backed-up queue are compacted: the IP they report must not depend
    # on how far behind the worker is.
    from agentsight_middleware.asgi import _facts

    trusted = TrustedProxies(["10.0.0.0/8"], header=header)  # type: ignore[arg-type]
    raw = (
        ("10.0.0.1", 5000), ("10.0.0.1", 80), "http", b"", b"Mozilla/5.0", None, None,
        b"shop.example", trusted, forwarded, forwarded_for, real_ip, None,
    )  # fmt: skip

    def conversation() -> Conversation:
        return pending_conversation(
            "conv_0123456789ab", "cookie", "chat", "POST /c", "/c", None, None, _facts, raw
        )

    compacted = conversation()
    compacted._compact()
    assert compacted.client_ip == conversation().client_ip


def test_the_docstring_names_what_as_dict_leaves_out() -> None:
    # It said as_dict() "gives them all", but the facts worked out from the fields are
    # properties that as_dict() does not hold.
    fields = _full()
    conversation = Conversation(**fields)
    worked_out = [
        name
        for name, value in vars(Conversation).items()
        if isinstance(value, property) and name not in conversation.as_dict()
    ]
    assert sorted(worked_out) == ["client_ip", "device", "is_bot", "language", "url"]
    doc = Conversation.__doc__ or ""
    assert "gives them all" not in doc
    for name in worked_out:
        assert f"``{name}``" in doc, name
