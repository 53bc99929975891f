"""Id extraction from cookies and JSON bodies agrees with the slow, obvious way."""

from __future__ import annotations

import json
from http.cookies import SimpleCookie
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agentsight_middleware._conversation import clean_id, cookie_value, json_field

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
