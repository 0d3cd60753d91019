"""fused_a2a.env_snapshot reads what os.environ holds, also after changes made through it."""

from __future__ import annotations

import os

from fused_a2a import env_snapshot


def test_values_follow_changes_made_through_os_environ(monkeypatch) -> None:
    names = ("FUSED_A2A_TEST_ONE", "FUSED_A2A_TEST_TWO")
    encoded = env_snapshot.encode(names)
    monkeypatch.delenv(names[0], raising=False)
    monkeypatch.delenv(names[1], raising=False)
    unset = env_snapshot.values(encoded)
    assert unset == (None, None)

    monkeypatch.setenv(names[0], "p2p")
    first = env_snapshot.values(encoded)
    assert first != unset and first[1] is None and os.environ[names[0]] == "p2p"

    monkeypatch.setenv(names[0], "all_to_all")
    assert env_snapshot.values(encoded) != first
    monkeypatch.setenv(names[0], "p2p")
    assert env_snapshot.values(encoded) == first
    monkeypatch.delenv(names[0])
    assert env_snapshot.values(encoded) == unset
