"""docs/auth.md's table is the truth: every route of the app has a row, and answers as its row says."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import LLAMA, live_server

AUTH_MD = Path(__file__).resolve().parents[2] / "docs" / "auth.md"
ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/\S*)` \| (none|api key|admin token) \|$")
KEY, ADMIN = "the-api-key", "the-admin-token"
REFUSED = (401, 403)


def table() -> dict[tuple[str, str], str]:
    rows = [ROW.match(line) for line in AUTH_MD.read_text().splitlines()]
    return {(m.group(1), m.group(2)): m.group(3) for m in rows if m}


def app_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, included routers flattened; HEAD goes with GET."""
    found = set()
    for route in app.routes:
        for ctx in route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]:
            original = getattr(ctx, "original_route", ctx)
            for method in getattr(original, "methods", None) or ():
                if method != "HEAD":
                    found.add((method, ctx.path))
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "nope", path)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("auth"), model=LLAMA, api_key=KEY, admin_token=ADMIN) as s:
        yield s


def test_every_route_has_a_row_and_every_row_a_route(srv):
    rows, routes = set(table()), app_routes(srv.app)
    assert routes - rows == set(), "routes without a row in docs/auth.md"
    assert rows - routes == set(), "rows in docs/auth.md for routes the app does not serve"


def _status(srv, method: str, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with srv.client() as c:
        return c.request(method, concrete(path), headers=headers).status_code


@pytest.mark.parametrize("method,path,token", sorted((m, p, t) for (m, p), t in table().items()))
def test_route_answers_as_its_row_says(srv, method, path, token):
    """No body is sent: a route that checks its token answers 401/403 first, else a 2xx/4xx of its own."""
    anonymous, wrong = _status(srv, method, path, None), _status(srv, method, path, "wrong")
    with_key, with_admin = _status(srv, method, path, KEY), _status(srv, method, path, ADMIN)
    if token == "none":
        assert anonymous not in REFUSED and wrong not in REFUSED
    elif token == "api key":
        assert (anonymous, wrong) == (401, 403)
        assert with_key not in REFUSED and with_admin not in REFUSED
    else:
        assert (anonymous, wrong, with_key) == (401, 403, 403)
        assert with_admin not in REFUSED


def test_api_key_alone_guards_admin_routes(srv):
    """With no admin token set, the admin routes take the api key, never nothing."""
    settings = srv.app.state.settings
    srv.app.state.settings = settings.model_copy(update={"admin_token": None})
    try:
        assert _status(srv, "DELETE", "/adapters/nope", None) == 401
        assert _status(srv, "DELETE", "/adapters/nope", KEY) == 404
    finally:
        srv.app.state.settings = settings


def test_adapter_records_need_the_api_key(srv):
    with srv.client() as c:
        r = c.get("/adapters")
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        r = c.get("/adapters", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "adapters" in r.json()


@pytest.mark.parametrize("header, got", [(None, "no header"), ("Basic abc", "another scheme"),
                                         ("Bearer", "no token")])
def test_a_401_names_the_scheme_and_what_came(srv, header, got):
    with srv.client() as c:
        r = c.get("/adapters", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["message"].endswith(f"got {got}"), r.text


@pytest.mark.parametrize("body", [b'{"prompt": ', b"\xff\xfe{}"], ids=["invalid JSON", "not UTF-8"])
@pytest.mark.parametrize("method,path", sorted((m, p) for (m, p), t in table().items() if t != "none" and m == "POST"))
def test_a_body_that_does_not_parse_is_refused_401_first(srv, method, path, body):
    """A client without a token learns nothing about the route's body: its 400 waits for a token."""
    with srv.client() as c:
        anonymous = c.request(method, concrete(path), content=body, headers={"content-type": "application/json"})
        keyed = c.request(method, concrete(path), content=body, headers={"content-type": "application/json",
                                                                         "Authorization": f"Bearer {ADMIN}"})
    assert anonymous.status_code == 401, anonymous.text
    assert keyed.status_code != 401
