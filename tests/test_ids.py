"""Minted conversation ids: the SDK's shape, unique, and never shared across fork()."""

from __future__ import annotations

import os
import re

from agentsight_middleware._conversation import is_valid_id, mint_id


def test_minted_ids_have_the_sdk_shape_and_do_not_repeat() -> None:
    ids = [mint_id() for _ in range(3000)]  # spans several refills of the buffer
    assert all(re.fullmatch(r"conv_[0-9a-f]{12}", i) for i in ids)
    assert all(is_valid_id(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_mints_other_ids_than_its_parent() -> None:
    mint_id()  # the parent has a buffer the child must not reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, ",".join(mint_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split(","))
    os.waitpid(pid, 0)
    parent = {mint_id() for _ in range(50)}
    assert len(child) == 50
    assert not child & parent
