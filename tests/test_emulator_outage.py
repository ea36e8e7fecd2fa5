"""The emulator's outage of a duration (``for_seconds``), on an injected monotonic clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from anybilld.emulator import Emulator, EmulatorSettings, EmulatorUser
from anybilld.httpserver import serve
from anybilld.secret import Secret

USER, PASSWORD = "alice@example.com", "alice-Pa55"
FORM = {
    "grant_type": "password",
    "username": USER,
    "password": PASSWORD,
    "client_id": "anybilld-demo-client",
    "scope": "https://ad.anybill.de/vendor/bill offline_access",
    "response_type": "token",
}
TOKEN = "/ad.anybill.de/oauth2/v2.0/token?p=b2c_1_ropc_vendor"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def served() -> AsyncIterator[tuple[httpx.AsyncClient, FakeMonotonic]]:
    clock = FakeMonotonic()
    settings = EmulatorSettings(users=(EmulatorUser(username=USER, password=Secret(PASSWORD)),))
    emulator = Emulator(settings, monotonic=clock)
    server = await serve(emulator.handle, "127.0.0.1", 0)
    host, port = server.address
    client = httpx.AsyncClient(base_url=f"http://{host}:{port}", trust_env=False, timeout=5)
    yield client, clock
    await client.aclose()
    await emulator.aclose()
    await server.close()


async def test_a_fault_for_seconds_lasts_that_long_and_no_longer(
    served: tuple[httpx.AsyncClient, FakeMonotonic],
) -> None:
    client, clock = served
    r = await client.post(
        "/_emulator/faults",
        json={"faults": [{"kind": "server_error", "times": None, "for_seconds": 30}]},
    )
    assert r.status_code == 200 and r.json()[0]["for_seconds"] == 30
    for _ in range(3):
        assert (await client.post(TOKEN, data=FORM)).status_code == 503
    clock.now += 29.5
    assert (await client.post(TOKEN, data=FORM)).status_code == 503
    assert (await client.get("/_emulator/faults")).json()[0]["for_seconds"] == 0.5
    clock.now += 0.5
    assert (await client.post(TOKEN, data=FORM)).status_code == 200
    assert (await client.get("/_emulator/faults")).json() == []


async def test_for_seconds_must_be_a_positive_number(
    served: tuple[httpx.AsyncClient, FakeMonotonic],
) -> None:
    client, _ = served
    for bad in (0, -1, "5", True):
        r = await client.post(
            "/_emulator/faults", json={"faults": [{"kind": "reset", "for_seconds": bad}]}
        )
        assert r.status_code == 400 and "for_seconds" in r.json()["error"]
