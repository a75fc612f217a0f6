"""API keys as the operator gives them, and how the edge matches a presented key."""

from __future__ import annotations

import json

import pytest

from folio.router.edge import AccessConfig, AccessPolicy, ApiKey, load_api_keys


def test_keys_from_flags_environment_and_files(tmp_path, monkeypatch):
    plain = tmp_path / "api_key"
    plain.write_text("sk-line-one\n\n  sk-line-two  \n")
    rich = tmp_path / "keys.json"
    rich.write_text(
        json.dumps([{"key": "sk-ops", "name": "ops", "allow_priority": True}, {"key": "sk-tenant", "cache_salt": "t"}])
    )
    monkeypatch.setenv("FOLIO_API_KEY", "sk-env\n")
    keys = load_api_keys(["sk-flag"], str(plain))
    assert [k.key for k in keys] == ["sk-flag", "sk-env", "sk-line-one", "sk-line-two"]
    keys = load_api_keys([], str(rich), salt_per_key=True)
    by_key = {k.key: k for k in keys}
    assert by_key["sk-ops"].allow_priority and not by_key["sk-tenant"].allow_priority
    assert by_key["sk-tenant"].cache_salt == "t"
    assert by_key["sk-ops"].cache_salt and by_key["sk-ops"].cache_salt != by_key["sk-env"].cache_salt
    assert "sk-ops" not in by_key["sk-ops"].cache_salt  # a salt never reveals its key
    for bad in ([{"name": "no key"}], {"key": "not a list"}, [{"key": ""}]):
        rich.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            load_api_keys([], str(rich))
    monkeypatch.delenv("FOLIO_API_KEY")
    with pytest.raises(ValueError):
        load_api_keys(["   "])


def test_match_finds_exactly_the_presented_key():
    policy = AccessPolicy(keys=(ApiKey("sk-a", "a"), ApiKey("sk-b", "b", allow_priority=True)))
    assert policy.match("sk-b").name == "b" and policy.match("sk-a").name == "a"
    for wrong in (None, "", "sk-", "sk-a ", "SK-A", "sk-ab", "sk-a\x00"):
        assert policy.match(wrong) is None
    assert policy.honours_priority(policy.match("sk-b")) and not policy.honours_priority(policy.match("sk-a"))
    assert AccessPolicy(config=AccessConfig(enable_priority=True)).honours_priority(None)
