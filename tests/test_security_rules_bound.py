"""The length bound on rules with competing wildcards (see _rules._max_length), from a
review: the count missed competing parts in *different* segments (a rule counted 2, bound
1,000, was cubic: a path under the bound held the loop for seconds), and counted int/float
parameters that cannot compete (a blog template lost every page past 31 characters).
"""

from __future__ import annotations

import time

from agentsight_middleware import _rules as new


def _time(rule: str, path: str) -> float:
    rules = new.RuleSet([rule], [])
    started = time.perf_counter()
    assert rules.match("GET", path) is None
    return time.perf_counter() - started


def test_competing_parts_in_several_segments_are_bounded() -> None:
    # Counted 2 (the most of one segment), so tried on paths up to 1,000 chars; but each
    # segment's split multiplies the next one's: quartic. 8.2 s measured at 907 chars.
    rule = "/*-*/*-*/*-*/end"
    path = "/" + "/".join(["-" * 300] * 3) + "/enX"
    assert _time(rule, path) < 0.1


def test_two_segment_template_is_bounded() -> None:
    rule = "/{a}-{b}/{c}-{d}/end"
    path = "/" + "-" * 450 + "/" + "-" * 450 + "/enX"
    assert _time(rule, path) < 0.1


def test_int_parameters_do_not_cut_a_blog_template() -> None:
    # `[0-9]+` followed by "-" cannot give or take a character: only {slug} varies, linear.
    rules = new.RuleSet(["/blog/{y:int}-{m:int}-{d:int}-{slug}"], [])
    path = "/blog/2024-01-15-a-fairly-long-post-title"
    assert rules.match("GET", path) is not None  # old: matched; now: None (bound 31)


def test_segment_param_before_path_param_is_not_bounded() -> None:
    # Starlette's /files/{user}/{rest:path}: {user} ends at the first "/", linear.
    rules = new.RuleSet([], ["POST /files/{user}/{rest:path}"])
    path = "/files/alice/" + "d/" * 600 + "x"
    assert rules.match("POST", path) is not None
