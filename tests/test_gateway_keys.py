"""Virtual keys: the admin API's lifecycle (LiteLLM's shapes), hashes only in Redis, 401/403, the CLI.

``PolicyServer`` runs the policy's steps around a canned upstream in a real uvicorn server, so these
tests exercise the policy through HTTP and the official ``openai`` client without the routing layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from contextlib import asynccontextmanager

import httpx
import openai
import pytest
import redis
import uvicorn
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, generate_latest
from starlette.responses import JSONResponse, Response

from redis_server import redis_server  # noqa: F401  (fixture)
from tureen.gateway.config import parse_config
from tureen.gateway.pipeline import Pipeline, RequestContext
from tureen.gateway.policy import build_policy

MASTER = "sk-master-for-tests-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(redis_url: str | None = None, *, master: bool = True, settings: dict | None = None,
                entry: dict | None = None, monkeypatch=None):
    data = {"model_list": [entry or {"model_name": "tiny", "litellm_params": {
        "model": "openai/tiny", "api_base": "http://127.0.0.1:9", "input_cost_per_token": 0.001,
        "output_cost_per_token": 0.002}}],
        "tureen_settings": settings or {}}
    if master:
        monkeypatch.setenv("TEST_MASTER_KEY", MASTER)
        data["general_settings"] = {"master_key": "os.environ/TEST_MASTER_KEY"}
    if redis_url:
        data["router_settings"] = {"redis_url": redis_url}
    config, warnings = parse_config(data)
    assert not warnings
    return config


class PolicyServer:
    """The policy's steps around a canned upstream (``completion_tokens`` tokens, after ``hold`` is set)."""

    def __init__(self, config, completion_tokens: int = 5) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.completion_tokens = completion_tokens
        self.hold: asyncio.Event | None = None  # set by tests to keep requests in flight
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen_after: list[RequestContext] = []
        self.app = self._app()

    def _app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            self.loop = asyncio.get_running_loop()
            self.policy = await build_policy(self.config, self.registry)
            self.pipeline = Pipeline(self.policy.steps)
            app.include_router(self.policy.admin_router)
            yield
            await self.policy.aclose()

        app = FastAPI(lifespan=lifespan)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            ctx = RequestContext(request, "chat", body, body.get("model", ""), bool(body.get("stream")))
            try:
                early = await self.pipeline.before(ctx)
                if early is not None:
                    ctx.status = early.status_code
                    return early
                response = await self._upstream(ctx)
                refusal = await self.pipeline.before_response(ctx)  # as the gateway app does
                if refusal is not None:
                    ctx.status, ctx.usage, ctx.cost = refusal.status_code, None, None
                    return refusal
                for name, value in ctx.response_headers.items():
                    response.headers[name] = value
                return response
            finally:
                await self.pipeline.after(ctx)
                self.seen_after.append(ctx)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            principal = await self.policy.authenticate(request)
            if isinstance(principal, Response):
                return principal
            names = [m for m in self.config.public_models() if principal.may_use(m)]
            return JSONResponse({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type="text/plain")
        return app

    async def _upstream(self, ctx: RequestContext) -> Response:
        if self.hold is not None:
            await self.hold.wait()
        params = self.config.model_list[0].litellm_params
        prompt, completion = ctx.prompt_tokens or 0, self.completion_tokens
        ctx.usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        ctx.cost = prompt * params.input_cost_per_token + completion * params.output_cost_per_token
        ctx.status, ctx.deployment = 200, "fake"
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": ctx.model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                          "finish_reason": "stop"}], "usage": ctx.usage})

    def __enter__(self) -> PolicyServer:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "policy server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def call_soon(self, fn) -> None:
        self.loop.call_soon_threadsafe(fn)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {MASTER}"}, **kwargs)

    def chat(self, key: str | None, model: str = "tiny", **body) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        payload = {"model": model, "messages": [{"role": "user", "content": "hello there"}], **body}
        return httpx.post(self.url + "/v1/chat/completions", json=payload, headers=headers)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def all_redis_bytes(url: str) -> bytes:
    """Every key name and every value in Redis, as one blob to search for secrets."""
    client = redis.Redis.from_url(url)
    blob = []
    for name in client.scan_iter("*"):
        blob.append(name)
        kind = client.type(name)
        if kind == b"string":
            blob.append(client.get(name))
        elif kind == b"hash":
            blob += [b for kv in client.hgetall(name).items() for b in kv]
        elif kind == b"zset":
            blob += [m for m, _ in client.zrange(name, 0, -1, withscores=True)]
        elif kind == b"set":
            blob += list(client.smembers(name))
    return b"\n".join(blob)


@pytest.fixture
def server(redis_server, monkeypatch):  # noqa: F811
    with PolicyServer(make_config(redis_server.url, monkeypatch=monkeypatch)) as s:
        yield s


def test_key_lifecycle_through_the_admin_api_stores_only_the_hash(server, redis_server):  # noqa: F811
    created = server.admin("POST", "/key/generate", json={
        "models": ["tiny"], "max_budget": 10, "budget_duration": "30d", "rpm_limit": 100, "tpm_limit": 10000,
        "max_parallel_requests": 4, "max_prompt_tokens": 500, "duration": "7d", "key_alias": "app-prod",
        "team_id": "search", "metadata": {"owner": "ana"}})
    assert created.status_code == 200, created.text
    body = created.json()
    key = body["key"]
    assert key.startswith("sk-") and len(key) >= 40
    token = hashlib.sha256(key.encode()).hexdigest()
    assert body["token"] == token
    assert body["models"] == ["tiny"] and body["rpm_limit"] == 100 and body["max_prompt_tokens"] == 500
    assert body["key_alias"] == "app-prod" and body["team_id"] == "search" and body["metadata"] == {"owner": "ana"}
    assert body["expires"] is not None and body["budget_reset_at"] is not None and body["spend"] == 0

    assert server.chat(key).status_code == 200
    info = server.admin("GET", "/key/info", params={"key": key}).json()
    assert info["key"] == token and info["info"]["spend"] > 0 and info["info"]["key_alias"] == "app-prod"
    assert server.admin("GET", "/key/info", params={"key": token}).json()["info"]["token"] == token
    own = httpx.get(server.url + "/key/info", headers={"Authorization": f"Bearer {key}"})
    assert own.status_code == 200 and own.json()["key"] == token  # a key may read itself

    updated = server.admin("POST", "/key/update", json={"key": key, "rpm_limit": 7, "models": ["tiny", "other"]})
    assert updated.status_code == 200 and updated.json()["rpm_limit"] == 7
    assert server.admin("GET", "/key/info", params={"key": token}).json()["info"]["models"] == ["tiny", "other"]

    listing = server.admin("GET", "/key/list").json()
    assert listing["keys"] == [token] and listing["total_count"] == 1 and listing["current_page"] == 1
    full = server.admin("GET", "/key/list", params={"return_full_object": "true", "team_id": "search"}).json()
    assert full["keys"][0]["token"] == token and full["keys"][0]["rpm_limit"] == 7
    assert server.admin("GET", "/key/list", params={"team_id": "other"}).json()["total_count"] == 0

    blob = all_redis_bytes(redis_server.url)
    assert token.encode() in blob
    assert key.encode() not in blob and key[3:].encode() not in blob and key[-12:].encode() not in blob

    deleted = server.admin("POST", "/key/delete", json={"keys": [key]})
    assert deleted.status_code == 200 and deleted.json() == {"deleted_keys": [token]}
    assert server.chat(key).status_code == 401
    assert server.admin("GET", "/key/list").json()["total_count"] == 0
    assert error_of(server.admin("POST", "/key/delete", json={"keys": [key]}))["code"] == "key_not_found"


def test_delete_by_alias_and_alias_uniqueness(server):
    a = server.admin("POST", "/key/generate", json={"key_alias": "one"}).json()
    clash = server.admin("POST", "/key/generate", json={"key_alias": "one"})
    assert clash.status_code == 400 and error_of(clash)["param"] == "key_alias"
    deleted = server.admin("POST", "/key/delete", json={"key_aliases": ["one"]})
    assert deleted.json() == {"deleted_keys": [a["token"]]}
    assert server.admin("POST", "/key/generate", json={"key_alias": "one"}).status_code == 200  # free again
    stale = server.admin("POST", "/key/generate", json={"key_alias": "two"}).json()["token"]
    redis.Redis.from_url(server.config.router_settings.redis_url).delete(f"tureen:key:{stale}")  # half-gone
    assert server.admin("POST", "/key/generate", json={"key_alias": "two"}).status_code == 200


def test_admin_api_needs_the_master_key_and_answers_bad_input_in_openai_shape(server):
    key = server.admin("POST", "/key/generate", json={}).json()["key"]
    for headers in ({}, {"Authorization": f"Bearer {key}"}, {"Authorization": "Bearer sk-wrong-master-key"}):
        r = httpx.post(server.url + "/key/generate", json={}, headers=headers)
        assert r.status_code == 401
        assert key not in r.text and "sk-wrong" not in r.text
    bad = server.admin("POST", "/key/generate", json={"rpm_limit": "lots"})
    assert bad.status_code == 400 and error_of(bad)["param"] == "rpm_limit"
    bad = server.admin("POST", "/key/generate", json={"duration": "forever"})
    assert bad.status_code == 400 and error_of(bad)["param"] == "duration"
    bad = server.admin("POST", "/key/generate", content=b"{nope")
    assert bad.status_code == 400 and error_of(bad)["code"] == "invalid_json"
    assert server.admin("GET", "/key/list", params={"size": "1000"}).status_code == 400
    assert server.admin("GET", "/key/info", params={"key": "sk-not-a-key-at-all"}).status_code == 404


def test_401_for_missing_unknown_expired_and_blocked_keys_and_403_for_other_models(server, redis_server):  # noqa: F811
    missing = server.chat(None)
    assert missing.status_code == 401 and error_of(missing)["code"] == "missing_api_key"
    unknown = server.chat("sk-this-key-does-not-exist-123456")
    assert unknown.status_code == 401 and error_of(unknown)["code"] == "invalid_api_key"
    assert "sk-this" not in unknown.text and "123456" not in unknown.text

    expired = server.admin("POST", "/key/generate", json={"duration": "1h", "key_alias": "old"}).json()
    client = redis.Redis.from_url(redis_server.url)
    record = json.loads(client.get(f"tureen:key:{expired['token']}"))
    record["expires"] = time.time() - 1  # as if the hour had passed
    client.set(f"tureen:key:{expired['token']}", json.dumps(record))
    r = server.chat(expired["key"])
    assert r.status_code == 401 and error_of(r)["code"] == "expired_api_key" and expired["key"] not in r.text

    blocked = server.admin("POST", "/key/generate", json={"blocked": True}).json()
    assert error_of(server.chat(blocked["key"]))["code"] == "blocked_api_key"

    scoped = server.admin("POST", "/key/generate", json={"models": ["other"]}).json()
    r = server.chat(scoped["key"], model="tiny")
    assert r.status_code == 403 and error_of(r)["code"] == "model_not_allowed" and error_of(r)["param"] == "model"
    assert scoped["key"] not in r.text
    everything = server.admin("POST", "/key/generate", json={"models": []}).json()
    assert server.chat(everything["key"]).status_code == 200

    metrics = server.metrics()
    for reason in ("missing_api_key", "invalid_api_key", "expired_api_key", "blocked_api_key", "model_not_allowed"):
        assert f'tureen_gateway_auth_failures_total{{reason="{reason}"}} 1.0' in metrics
    for secret in (expired["key"], blocked["key"], scoped["key"], MASTER):
        assert secret not in metrics


def test_the_openai_client_sees_its_errors_and_v1_models_is_filtered(server):
    scoped = server.admin("POST", "/key/generate", json={"models": ["other"]}).json()["key"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=scoped, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in client.models.list()] == []
    wide = server.admin("POST", "/key/generate", json={"models": ["tiny"]}).json()["key"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=wide, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}]).usage
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-nope-nope-nope", max_retries=0).models.list()


def test_default_key_limits_apply_to_new_keys(redis_server, monkeypatch):  # noqa: F811
    config = make_config(redis_server.url, monkeypatch=monkeypatch,
                         settings={"default_key_limits": {"rpm_limit": 2, "max_budget": 5}})
    with PolicyServer(config) as s:
        own = s.admin("POST", "/key/generate", json={"rpm_limit": 9}).json()
        default = s.admin("POST", "/key/generate", json={}).json()
    assert own["rpm_limit"] == 9 and own["max_budget"] == 5
    assert default["rpm_limit"] == 2 and default["max_budget"] == 5


def test_keys_are_optional_when_not_required(redis_server, monkeypatch):  # noqa: F811
    config = make_config(redis_server.url, monkeypatch=monkeypatch, settings={"require_virtual_keys": False})
    with PolicyServer(config) as s:
        assert s.chat(None).status_code == 200
        assert s.chat("EMPTY").status_code == 200  # SDKs insist on some key
        limited = s.admin("POST", "/key/generate", json={"rpm_limit": 1}).json()["key"]
        assert s.chat(limited).status_code == 200
        assert s.chat(limited).status_code == 429  # a real key still carries its limits


def test_admin_api_is_disabled_without_a_master_key(redis_server, monkeypatch):  # noqa: F811
    with PolicyServer(make_config(redis_server.url, master=False, monkeypatch=monkeypatch)) as s:
        r = httpx.post(s.url + "/key/generate", json={})
        assert r.status_code == 403 and error_of(r)["code"] == "admin_disabled"
        assert s.chat(None).status_code == 200  # no master key: keys are not required by default


# ---- the CLI ---------------------------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from tureen.cli import main
    capsys.readouterr()
    status = main(["gateway", "keys", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_key_lifecycle_through_the_cli(server, redis_server, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TUREEN_MASTER_KEY", MASTER)
    monkeypatch.setenv("TUREEN_GATEWAY_URL", server.url)
    status, out, _ = cli(capsys, "create", "--models", "tiny", "--rpm-limit", "5", "--key-alias", "cli-app",
                         "--team-id", "ops", "--max-budget", "2", "--budget-duration", "1d", "--metadata",
                         '{"env": "test"}')
    assert status == 0
    key = out.split()[0]
    assert key.startswith("sk-") and "hash" in out and "cannot show it again" in out
    token = hashlib.sha256(key.encode()).hexdigest()
    assert server.chat(key).status_code == 200

    status, out, _ = cli(capsys, "info", key, "--json")
    info = json.loads(out)["info"]
    assert status == 0 and info["token"] == token and info["rpm_limit"] == 5 and info["metadata"] == {"env": "test"}
    assert cli(capsys, "update", token, "--rpm-limit", "9", "--models", "tiny,big")[0] == 0
    status, out, _ = cli(capsys, "list", "--json")
    assert status == 0 and [k["token"] for k in json.loads(out)["keys"]] == [token]
    assert json.loads(out)["keys"][0]["rpm_limit"] == 9
    status, out, _ = cli(capsys, "list")  # the table
    assert status == 0 and "cli-app" in out and token[:12] in out and key not in out
    status, out, _ = cli(capsys, "delete", "--key-alias", "cli-app")
    assert status == 0 and token in out
    assert server.chat(key).status_code == 401
    assert key.encode() not in all_redis_bytes(redis_server.url)

    status, _, err = cli(capsys, "info", token)
    assert status == 1 and "404" in err
    monkeypatch.setenv("TUREEN_MASTER_KEY", "sk-wrong-master-key-xyz")
    status, _, err = cli(capsys, "list")
    assert status == 1 and "401" in err and "sk-wrong" not in err
    monkeypatch.delenv("TUREEN_MASTER_KEY")
    monkeypatch.delenv("LITELLM_MASTER_KEY", raising=False)
    status, _, err = cli(capsys, "list")
    assert status == 2 and "no master key" in err
    status, _, err = cli(capsys, "list", "--url", "http://127.0.0.1:9", "--master-key-env", "TEST_MASTER_KEY")
    assert status == 1 and "cannot reach the gateway" in err


def test_cli_reads_the_master_key_through_the_config_file(server, tmp_path, capsys, monkeypatch):
    config = tmp_path / "gateway.yaml"
    config.write_text("model_list:\n  - model_name: tiny\n    litellm_params: {model: openai/tiny, api_base: "
                      "'http://127.0.0.1:9'}\ngeneral_settings:\n  master_key: os.environ/TEST_MASTER_KEY\n")
    status, out, _ = cli(capsys, "create", "--url", server.url, "--config", str(config), "--json")
    assert status == 0 and json.loads(out)["key"].startswith("sk-")


def test_an_unreadable_key_record_is_refused_not_a_500(server, redis_server):  # noqa: F811
    created = server.admin("POST", "/key/generate", json={}).json()
    redis.Redis.from_url(redis_server.url).set(f"tureen:key:{created['token']}", b"{not json")
    r = server.chat(created["key"])
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"


def test_key_list_pages_in_creation_order(server):
    tokens = [server.admin("POST", "/key/generate", json={"team_id": "even" if i % 2 == 0 else "odd"}).json()["token"]
              for i in range(23)]
    pages = [server.admin("GET", "/key/list", params={"page": p, "size": 10}).json() for p in (1, 2, 3)]
    assert [k for page in pages for k in page["keys"]] == tokens
    assert [len(p["keys"]) for p in pages] == [10, 10, 3] and {p["total_pages"] for p in pages} == {3}
    full = server.admin("GET", "/key/list", params={"page": 2, "size": 10, "return_full_object": "true"}).json()
    assert [k["token"] for k in full["keys"]] == tokens[10:20] and all("spend" in k for k in full["keys"])
    even = server.admin("GET", "/key/list", params={"team_id": "even", "size": 5, "page": 3}).json()
    assert even["keys"] == tokens[0::2][10:15] and even["total_count"] == 12 and even["total_pages"] == 3


@pytest.mark.parametrize("lookup_ttl", [0, 60])
def test_key_lookup_cache_trades_round_trips_for_cross_gateway_staleness(redis_server, monkeypatch,  # noqa: F811
                                                                         lookup_ttl):
    config = make_config(redis_server.url, monkeypatch=monkeypatch, settings={"key_lookup_ttl_s": lookup_ttl})
    with PolicyServer(config) as s:
        created = s.admin("POST", "/key/generate", json={}).json()
        assert s.chat(created["key"]).status_code == 200
        # another gateway deletes the key: only Redis changes, this process is not told
        redis.Redis.from_url(redis_server.url).delete(f"tureen:key:{created['token']}")
        elsewhere = s.chat(created["key"]).status_code
        own = s.admin("POST", "/key/generate", json={"rpm_limit": 1}).json()
        assert s.chat(own["key"]).status_code == 200
        s.admin("POST", "/key/delete", json={"keys": [own["token"]]})  # through this gateway: effective at once
        here = s.chat(own["key"]).status_code
    assert elsewhere == (401 if lookup_ttl == 0 else 200)
    assert here == 401


def test_keys_in_the_x_api_key_and_api_key_headers_work_too(server):
    key = server.admin("POST", "/key/generate", json={}).json()["key"]
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    for header in ("x-api-key", "api-key"):
        assert httpx.post(server.url + "/v1/chat/completions", json=payload, headers={header: key}).status_code == 200
    wrong = httpx.post(server.url + "/v1/chat/completions", json=payload, headers={"Authorization": "Basic abc"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"


def test_a_token_sent_as_the_bearer_does_not_read_another_keys_info(server):
    victim = server.admin("POST", "/key/generate", json={"key_alias": "victim"}).json()
    r = httpx.get(server.url + "/key/info", headers={"Authorization": f"Bearer {victim['token']}"})
    assert r.status_code == 401 and "victim" not in r.text
    r = httpx.get(server.url + "/key/info", params={"key": victim["token"]},
                  headers={"Authorization": f"Bearer {victim['token']}"})
    assert r.status_code == 401 and "victim" not in r.text
    blocked = server.admin("POST", "/key/generate", json={"blocked": True}).json()
    assert httpx.get(server.url + "/key/info", headers={"Authorization": f"Bearer {blocked['key']}"}).status_code == 401


def test_zero_limits_are_refused_at_creation(server):
    for field in ("rpm_limit", "tpm_limit", "max_parallel_requests"):
        r = server.admin("POST", "/key/generate", json={field: 0})
        assert r.status_code == 400 and error_of(r)["param"] == field
