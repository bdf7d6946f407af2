"""Compatibility check: the published apipool-ng 1.0.9 SDK, unchanged, against our server.

Run by crates/apipool-cli/tests/python_sdk.rs, which starts the real `apipool` binary and a
mock upstream, seeds a pool, and passes everything through the environment:

  APIPOOL_URL, APIPOOL_USER, APIPOOL_PASSWORD   the server and a user
  POOL                                          a pool of that user (2 keys, upstream = UPSTREAM)
  UPSTREAM                                      the mock upstream (for keys used locally)
  PRICE_BITCOIN, PRICE_ETHEREUM                 what the mock answers for /price?id=...
  SPARE_KEY, SPARE_KEY_2                        raw keys the mock accepts, not yet on the server

Each check prints "OK <name>"; the last line is "ALL OK". Any failure raises (exit status 1).
"""

import asyncio
import os
import sys
import tempfile
import time

import httpx
import sqlalchemy

import apipool
from apipool import (
    ApiKey,
    AsyncDynamicKeyManager,
    DynamicKeyManager,
    aget_config,
    aget_keys,
    alogin,
    async_connect,
    connect,
    get_config,
    get_keys,
    login,
)

URL = os.environ["APIPOOL_URL"]
USER = os.environ["APIPOOL_USER"]
PASSWORD = os.environ["APIPOOL_PASSWORD"]
POOL = os.environ["POOL"]
UPSTREAM = os.environ["UPSTREAM"]
PRICE_BTC = float(os.environ["PRICE_BITCOIN"])
PRICE_ETH = float(os.environ["PRICE_ETHEREUM"])
SPARE = os.environ["SPARE_KEY"]
SPARE_2 = os.environ["SPARE_KEY_2"]


def ok(name):
    print(f"OK {name}", flush=True)


def expect_status(fn, status):
    try:
        fn()
    except httpx.HTTPStatusError as e:
        assert e.response.status_code == status, e.response.status_code
        return e
    raise AssertionError(f"expected HTTP {status}")


class LocalKey(ApiKey):
    """Keys used locally (get_keys mode): a plain httpx client per key."""

    def __init__(self, raw):
        self.raw = raw

    def get_primary_key(self):
        return self.raw

    def create_client(self):
        return httpx.Client(base_url=UPSTREAM, headers={"Authorization": f"Bearer {self.raw}"})

    def test_usability(self, client):
        return client.get("/price", params={"id": "x"}).status_code == 200


def wait_until(cond, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def server_call(token, method, path, **kwargs):
    r = httpx.request(method, f"{URL}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, **kwargs)
    r.raise_for_status()
    return r


def sync_checks():
    assert apipool.__version__ == "1.0.9", apipool.__version__
    tokens = login(URL, USER, PASSWORD)
    assert tokens["token_type"] == "bearer"
    assert isinstance(tokens["expires_in"], int)
    assert tokens["access_token"] and tokens["refresh_token"]
    token = tokens["access_token"]
    expect_status(lambda: login(URL, USER, "wrong-password"), 401)
    ok("login")

    keys = get_keys(URL, POOL, token)
    assert len(keys) == 2 and all(isinstance(k, str) and k for k in keys), keys
    expect_status(lambda: get_keys(URL, "no-such-pool", token), 404)
    expect_status(lambda: get_keys(URL, POOL, "not-a-token"), 401)
    ok("get_keys")

    cfg = get_config(URL, POOL, token)
    assert cfg.rate_limit == 100 and cfg.rate_limit_interval == 1, cfg
    assert cfg.retry_on_failure is True and cfg.max_retries == 2, cfg
    assert cfg.rotation_strategy == "round_robin", cfg
    assert cfg.client_type == "generic", cfg
    assert cfg.reach_limit_exception == "httpx.HTTPStatusError", cfg
    assert cfg.custom == {"team": "compat"}, cfg
    assert cfg.ban_threshold == 3 and cfg.effective_batch_max_retries == 2, cfg
    ok("get_config")

    manager = connect(service_url=URL, pool_identifier=POOL, auth_token=token)
    r = manager.dummyclient.get("/price", params={"id": "bitcoin"})
    assert r["_type"] == "httpx.Response", r
    assert r["status_code"] == 200, r
    assert abs(r["data"]["price"] - PRICE_BTC) < 1e-9, r
    r = manager.dummyclient.get(url="price", params={"id": "ethereum"})
    assert abs(r["data"]["price"] - PRICE_ETH) < 1e-9, r
    r = manager.dummyclient.post("/echo/items", json={"n": 1}, headers={"X-Trace": "py"})
    echoed = r["data"]
    assert echoed["method"] == "POST" and echoed["path"] == "/echo/items", echoed
    assert echoed["body"] == '{"n":1}', echoed
    assert echoed["headers"]["x-trace"] == "py", echoed
    assert echoed["headers"]["authorization"] in (f"Bearer {k}" for k in keys), echoed
    r = manager.dummyclient.get("/nope")
    assert r["status_code"] == 404, r
    # The usability check goes to /proxy/{pool}/status.
    service_key = manager.fetch_one(f"service-proxy:{POOL}")
    assert service_key.is_usable() is True
    ok("connect_dummyclient")

    # What the original allowed and we refuse: absolute URLs, other hosts, attribute walking.
    # (The SDK archives its only "key" on any error, so each refusal gets a fresh manager.)
    for bad in ("http://127.0.0.1:9/", "//127.0.0.1:9/x", "../../etc/passwd", "%2e%2e/x"):
        try:
            connect(URL, POOL, token).dummyclient.get(bad)
        except httpx.HTTPStatusError as e:
            assert e.response.status_code == 400, e.response.status_code
        else:
            raise AssertionError(f"{bad} was not refused")
    try:
        getattr(connect(URL, POOL, token).dummyclient, "__globals__")()
    except httpx.HTTPStatusError as e:
        assert e.response.status_code == 400
    else:
        raise AssertionError("an unknown method was not refused")
    try:
        connect(URL, "no-such-pool", token).dummyclient.get("/price")
    except httpx.HTTPStatusError as e:
        assert e.response.status_code == 404
    else:
        raise AssertionError("an unknown pool was not refused")
    ok("proxy_refusals")

    # DynamicKeyManager following the server: add a key there, see it here; remove it again.
    # (Its default stats database is an in-memory SQLite that the refresh thread cannot see —
    # a bug of the SDK itself — so it gets a file.)
    added, removed = [], []
    dyn = DynamicKeyManager(
        db_engine=sqlalchemy.create_engine(f"sqlite:///{tempfile.mkdtemp()}/stats.db"),
        key_fetcher=lambda: get_keys(URL, POOL, token),
        api_key_factory=LocalKey,
        refresh_interval=0.2,
        config_fetcher=lambda: get_config(URL, POOL, token),
        on_keys_added=added.extend,
        on_keys_removed=removed.extend,
    )
    try:
        assert dyn.pool_size == 2, dyn.pool_size
        assert dyn.config.rate_limit == 100
        resp = dyn.dummyclient.get("/price", params={"id": "bitcoin"})
        assert resp.status_code == 200 and abs(resp.json()["price"] - PRICE_BTC) < 1e-9
        server_call(token, "POST", "/keys", json={"identifier": "py-spare", "raw_key": SPARE})
        server_call(token, "POST", f"/pools/{POOL}/members", json={"key_identifiers": ["py-spare"]})
        wait_until(lambda: dyn.pool_size == 3, "the added key")
        assert SPARE in added, added
        assert SPARE in dyn.apikey_chain
        server_call(token, "DELETE", f"/pools/{POOL}/members/py-spare")
        wait_until(lambda: dyn.pool_size == 2, "the removed key")
        assert SPARE in removed, removed
    finally:
        dyn.shutdown()
    ok("dynamic_key_manager")
    return token


async def async_checks(token):
    tokens = await alogin(URL, USER, PASSWORD)
    assert tokens["token_type"] == "bearer"
    try:
        await alogin(URL, USER, "wrong-password")
    except httpx.HTTPStatusError as e:
        assert e.response.status_code == 401
    else:
        raise AssertionError("a wrong password was accepted")
    token = tokens["access_token"]
    ok("alogin")

    keys = await aget_keys(URL, POOL, token)
    assert len(keys) == 2, keys
    ok("aget_keys")

    cfg = await aget_config(URL, POOL, token)
    assert cfg.rate_limit == 100 and cfg.rotation_strategy == "round_robin", cfg
    ok("aget_config")

    manager = await async_connect(service_url=URL, pool_identifier=POOL, auth_token=token)
    r = await manager.adummyclient.get("/price", params={"id": "bitcoin"})
    assert r["_type"] == "httpx.Response" and r["status_code"] == 200, r
    assert abs(r["data"]["price"] - PRICE_BTC) < 1e-9, r
    results = await asyncio.gather(
        *(manager.adummyclient.get("/price", params={"id": "ethereum"}) for _ in range(10))
    )
    assert all(abs(x["data"]["price"] - PRICE_ETH) < 1e-9 for x in results)
    service_key = manager.fetch_one(f"async-service-proxy:{POOL}")
    assert await service_key.ais_usable() is True
    ok("async_connect_adummyclient")

    dyn = AsyncDynamicKeyManager(
        db_engine=sqlalchemy.create_engine(f"sqlite:///{tempfile.mkdtemp()}/stats.db"),
        key_fetcher=lambda: aget_keys(URL, POOL, token),
        api_key_factory=LocalKey,
        refresh_interval=3600,
        config_fetcher=lambda: aget_config(URL, POOL, token),
    )
    await dyn.ainit()
    assert len(dyn.apikey_chain) == 2, len(dyn.apikey_chain)
    async with httpx.AsyncClient(base_url=f"{URL}/api/v1", headers={"Authorization": f"Bearer {token}"}) as c:
        (await c.post("/keys", json={"identifier": "py-spare-2", "raw_key": SPARE_2})).raise_for_status()
        (await c.post(f"/pools/{POOL}/members", json={"key_identifiers": ["py-spare-2"]})).raise_for_status()
    await dyn.arefresh()
    assert len(dyn.apikey_chain) == 3 and SPARE_2 in dyn.apikey_chain, list(dyn.apikey_chain)
    await dyn.ashutdown()
    ok("async_dynamic_key_manager")


def main():
    token = sync_checks()
    asyncio.run(async_checks(token))
    print("ALL OK", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
