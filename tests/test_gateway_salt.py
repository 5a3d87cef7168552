"""Per-tenant cache_salt: what the gateway sends upstream for each caller (fake upstream, real gateway process).

The end-to-end check against a real replica's prefix cache is in test_gateway_real.py.
"""

from __future__ import annotations

import httpx

from gateway_procs import FakeProc, GatewayProc, deployment

MASTER = "sk-master-salt-tests-0123456789abcdef"
ENV = {"SALT_MASTER_KEY": MASTER}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def _gateway(tmp_path, procs, fake, *, salt: dict | None = None, **deployment_params) -> GatewayProc:
    config = {"model_list": [deployment("m", fake, **deployment_params)],
              "general_settings": {"master_key": "os.environ/SALT_MASTER_KEY"}}
    if salt is not None:
        config["tureen_settings"] = {"cache_salt": salt}
    gw = GatewayProc(tmp_path, config, env=ENV)
    procs.append(gw)
    return gw


def _key(gw: GatewayProc, **fields) -> str:
    r = httpx.post(gw.url + "/key/generate", json=fields, headers={"Authorization": f"Bearer {MASTER}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["key"]


def _sent_salt(gw: GatewayProc, fake: FakeProc, key: str, **extra) -> str | None:
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, **extra},
                   headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return fake.stats()["last_bodies"][-1].get("cache_salt")


def test_each_tenant_gets_its_own_salt_and_a_client_cannot_choose_another_tenants(tmp_path, procs):
    fake = FakeProc(tmp_path)
    procs.append(fake)
    gw = _gateway(tmp_path, procs, fake)  # the default: on, scope team
    alpha1, alpha2 = _key(gw, team_id="alpha"), _key(gw, team_id="alpha")
    beta, solo = _key(gw, team_id="beta"), _key(gw)
    salts = {name: _sent_salt(gw, fake, key) for name, key in
             (("alpha1", alpha1), ("alpha2", alpha2), ("beta", beta), ("solo", solo), ("master", MASTER))}
    assert all(isinstance(s, str) and len(s) == 64 for s in salts.values())
    assert salts["alpha1"] == salts["alpha2"]  # one team shares its prefix cache
    assert len({salts["alpha1"], salts["beta"], salts["solo"], salts["master"]}) == 4
    assert _sent_salt(gw, fake, alpha1) == salts["alpha1"]  # stable
    # the salt is no plain function of the team name or of the key: it is keyed
    assert "alpha" not in salts["alpha1"] and alpha1 not in salts["alpha1"]
    # a client's own cache_salt narrows its tenant's cache, and never equals another tenant's salt
    own = _sent_salt(gw, fake, beta, cache_salt="user-7")
    assert own not in salts.values() and own != "user-7"
    assert _sent_salt(gw, fake, alpha1, cache_salt="user-7") not in (own, salts["alpha1"])
    # beta copying alpha's salt as its own cache_salt still lands in beta's space
    assert _sent_salt(gw, fake, beta, cache_salt=salts["alpha1"]) != salts["alpha1"]
    # the stream path carries it too
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                   headers={"Authorization": f"Bearer {beta}"}, timeout=30)
    assert r.status_code == 200 and fake.stats()["last_bodies"][-1]["cache_salt"] == salts["beta"]


def test_scope_key_separates_the_keys_of_one_team_and_a_bad_client_salt_is_a_400(tmp_path, procs):
    fake = FakeProc(tmp_path)
    procs.append(fake)
    gw = _gateway(tmp_path, procs, fake, salt={"scope": "key"})
    one, two = _key(gw, team_id="alpha"), _key(gw, team_id="alpha")
    assert _sent_salt(gw, fake, one) != _sent_salt(gw, fake, two)
    for bad in ("", 7, "x" * 257):
        r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "cache_salt": bad},
                       headers={"Authorization": f"Bearer {one}"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_off_passes_the_clients_salt_through_and_a_deployment_can_refuse_the_field(tmp_path, procs):
    fake = FakeProc(tmp_path)
    procs.append(fake)
    gw = _gateway(tmp_path, procs, fake, salt={"enabled": False})
    key = _key(gw, team_id="alpha")
    assert _sent_salt(gw, fake, key) is None
    assert _sent_salt(gw, fake, key, cache_salt="mine") == "mine"
    assert "tenants share prefix-cache blocks" in gw.log_text()
    other = FakeProc(tmp_path)
    procs.append(other)
    gw2 = GatewayProc(tmp_path, {"model_list": [{**deployment("m", other), "tureen_params": {"cache_salt": False}}],
                                 "general_settings": {"master_key": "os.environ/SALT_MASTER_KEY"}}, env=ENV)
    procs.append(gw2)
    key2 = _key(gw2, team_id="alpha")
    assert _sent_salt(gw2, other, key2) is None and _sent_salt(gw2, other, key2, cache_salt="mine") is None


def test_a_secret_makes_two_gateways_agree_and_anonymous_callers_are_left_alone(tmp_path, procs):
    fake = FakeProc(tmp_path)
    procs.append(fake)
    env = {**ENV, "SALT_SECRET": "s3cret-for-the-salt-hmac"}
    config = {"model_list": [deployment("m", fake)], "general_settings": {"master_key": "os.environ/SALT_MASTER_KEY"},
              "tureen_settings": {"cache_salt": {"secret": "os.environ/SALT_SECRET"}, "require_virtual_keys": False}}
    gws = [GatewayProc(tmp_path, config, env=env) for _ in range(2)]
    procs.extend(gws)
    keys = [_key(gw, team_id="alpha") for gw in gws]  # each gateway keeps its own keys (no Redis)
    assert _sent_salt(gws[0], fake, keys[0]) == _sent_salt(gws[1], fake, keys[1])  # same team, same secret
    r = httpx.post(gws[0].url + "/v1/chat/completions", json={**CHAT, "cache_salt": "anon"}, timeout=30)
    assert r.status_code == 200 and fake.stats()["last_bodies"][-1]["cache_salt"] == "anon"
    r = httpx.post(gws[0].url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200 and "cache_salt" not in fake.stats()["last_bodies"][-1]
