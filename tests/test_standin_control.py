"""The stand-in's keep= and its orders over HTTP: edge cases a review found."""

from __future__ import annotations

from agentsight_middleware._standin import StandInAgentSightAPI

from .test_standin import CONVERSATIONS, conversation, http_client


def test_wait_for_conversations_counts_those_keep_let_go() -> None:
    # keep=10: the recorded list is cut to 10 past 20 requests, and wait_for(conversations=N)
    # compares N with that list's length: 30 accepted never reach 30.
    with StandInAgentSightAPI(keep=10) as api, http_client(api) as c:
        for i in range(30):
            answer = c.post(CONVERSATIONS, json=conversation(conversation_id=f"c{i}"))
            assert answer.status_code == 201
        assert api.summary()["initialized"] == 30
        api.wait_for(conversations=30, timeout=1)


def test_a_huge_n_is_refused_not_allocated() -> None:
    # fail?n=10**12: [fault] * n is allocated before the deque takes it (8 TB: a
    # MemoryError, answered 500 "stand-in error"); n=10**8..10**9 is gigabytes that do
    # get allocated, twice (the list, then the deque).
    with StandInAgentSightAPI() as api, http_client(api) as c:
        answer = c.post("/_standin/fail", params={"n": str(10**12)})
        assert answer.status_code in (200, 400), answer.text
        summary = c.get("/_standin/summary").json()
        assert summary["faults_pending"] in (0, 10**12)


def test_head_of_summary_is_answered_as_get() -> None:
    with StandInAgentSightAPI() as api, http_client(api) as c:
        assert c.head("/_standin/summary").status_code == 200


def test_the_conversations_it_kept_are_read_over_http() -> None:
    # Run from the command line, the stand-in said how many page views and chats it took,
    # never which: that a chat came on its page view's conversation could not be seen.
    with StandInAgentSightAPI(keep=3) as api, http_client(api) as c:
        for i in range(4):
            c.post(CONVERSATIONS, json=conversation(conversation_id=f"c{i}", is_used=i == 3))
        kept = c.get("/_standin/conversations").json()["conversations"]
        assert [(k["conversation_id"], k["is_used"]) for k in kept] == [
            ("c0", False),
            ("c1", False),
            ("c2", False),
            ("c3", True),
        ]
        assert c.post("/_standin/conversations").status_code == 405
        with http_client(api, auth=False) as anonymous:
            assert anonymous.get("/_standin/conversations").status_code == 401
