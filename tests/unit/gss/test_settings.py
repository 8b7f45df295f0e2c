"""auth.gssapi: parsing, and the level the gateway agrees to (RFC 1961 section 4)."""

from __future__ import annotations

from typing import Any

import pytest

from translator.config import ConfigError, config_from_mapping
from translator.gss.settings import GssapiConfig
from translator.wire import ProtectionLevel as L

EVERY = frozenset(L) - {L.SELECTIVE}


def gssapi(**raw: Any) -> GssapiConfig:
    auth = {"methods": ["gssapi"], "gssapi": {"keytab": "/etc/socks64/socks64.keytab", **raw}}
    return config_from_mapping({"auth": auth}).auth.gssapi


def test_defaults() -> None:
    config = gssapi()
    assert config.service == "rcmd"
    assert config.protection == (L.INTEGRITY, L.CONFIDENTIALITY)
    assert config.max_token_size == 48000


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"protection": "secret"}, "auth.gssapi.protection[0]"),
        ({"protection": []}, "auth.gssapi.protection"),
        ({"protection": ["selective"]}, "auth.gssapi.protection[0]"),
        ({"service": "rcmd/host"}, "auth.gssapi.service"),
        ({"service": ""}, "auth.gssapi.service"),
        ({"max_token_size": 100}, "auth.gssapi.max_token_size"),
        ({"max_token_size": 70000}, "auth.gssapi.max_token_size"),
        ({"keytab": None}, "auth.gssapi.keytab"),
        ({"principal": "x"}, "auth.gssapi.principal"),
    ],
)
def test_bad_settings_name_their_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        gssapi(**raw)
    assert error.value.key == key


def test_a_single_level_may_be_a_string() -> None:
    assert gssapi(protection="confidentiality").protection == (L.CONFIDENTIALITY,)


@pytest.mark.parametrize(
    ("allowed", "requested", "offered", "agreed"),
    [
        ([L.INTEGRITY, L.CONFIDENTIALITY], L.INTEGRITY, EVERY, L.INTEGRITY),
        ([L.INTEGRITY, L.CONFIDENTIALITY], L.NONE, EVERY, L.CONFIDENTIALITY),  # 0 not allowed
        ([L.NONE, L.INTEGRITY], L.NONE, EVERY, L.NONE),
        ([L.NONE, L.INTEGRITY, L.CONFIDENTIALITY], L.SELECTIVE, EVERY, L.CONFIDENTIALITY),
        ([L.INTEGRITY], L.CONFIDENTIALITY, EVERY, L.INTEGRITY),
        # a context without confidentiality cannot give level 2, however allowed
        ([L.CONFIDENTIALITY, L.INTEGRITY], L.CONFIDENTIALITY, {L.NONE, L.INTEGRITY}, L.INTEGRITY),
    ],
)
def test_the_level_agreed(
    allowed: list[L], requested: L, offered: set[L], agreed: L
) -> None:
    config = GssapiConfig(keytab="k", protection=tuple(allowed))
    assert config.agree(requested, frozenset(offered)) is agreed


def test_nothing_allowed_and_offered_is_refused() -> None:
    config = GssapiConfig(keytab="k", protection=(L.CONFIDENTIALITY,))
    with pytest.raises(ValueError):
        config.agree(L.CONFIDENTIALITY, frozenset({L.NONE, L.INTEGRITY}))


def test_gssapi_needs_a_keytab() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_mapping({"auth": {"methods": ["gssapi"]}})
    assert error.value.key == "auth.gssapi.keytab"
