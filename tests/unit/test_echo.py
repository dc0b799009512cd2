"""The demo upstream: JSON for API clients, the header list as an HTML table for browsers,
every value escaped."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from authz.demo.echo import make_app


async def test_browsers_get_a_table_api_clients_json() -> None:
    async with TestClient(TestServer(make_app())) as client:
        sent = {"x-stepup-user": "alice", "x-other": "<script>alert(1)</script>"}
        resp = await client.get("/accounts/1?tab=2", headers={**sent, "Accept": "text/html"})
        page = await resp.text()
        assert resp.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert "<tr class=stepup><th>x-stepup-user</th><td>alice</td></tr>" in page
        assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<code>/accounts/1?tab=2</code>" in page
        assert page.index("x-stepup-user") < page.index("x-other")  # the service's first
        for accept in ("*/*", "text/html,application/json;q=0.9"):
            resp = await client.get("/accounts/1?tab=2", headers={**sent, "Accept": accept})
            doc = await resp.json()
            assert doc["path"] == "/accounts/1" and doc["query"] == "tab=2"
            assert doc["headers"]["x-stepup-user"] == "alice"
