"""Security checks of issue 18, section 5, against real processes: an invalid key never reaches an upstream.

(No key or prompt text in the logs at the default level: tests/test_soak.py greps the logs of its
soak runs. Prefix-cache hashing and salts: tests/test_defects_block_hash.py.)
"""

from __future__ import annotations

import httpx
from gateway_procs import FakeProc, GatewayProc, deployment

MASTER = "sk-security-master-0123456789"


def test_an_invalid_key_never_reaches_the_upstream(tmp_path):
    fake = FakeProc(tmp_path)
    gw = GatewayProc(tmp_path, {"model_list": [deployment("tiny", fake)],
                                "general_settings": {"master_key": "os.environ/SEC_MASTER"}},
                     env={"SEC_MASTER": MASTER})
    try:
        chat = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "secret prompt text"}]}
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Bearer {MASTER}x"},
                        {"Authorization": "Basic abc"}):
            for stream in (False, True):
                r = httpx.post(gw.url + "/v1/chat/completions", json={**chat, "stream": stream}, headers=headers,
                               timeout=10)
                assert r.status_code == 401 and r.json()["error"]["message"], (headers, r.text)
        assert fake.stats()["requests"] == 0  # not one of them was forwarded
        ok = httpx.post(gw.url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {MASTER}"},
                        timeout=10)
        assert ok.status_code == 200 and fake.stats()["requests"] == 1  # the check is not just "forward nothing"
        log = gw.log_text()
        assert MASTER not in log and "sk-wrong" not in log and "secret prompt text" not in log
    finally:
        gw.stop()
        fake.stop()
