"""The Ingress's route order: the hot routes are tried first, and the order never decides
which route answers a request."""

from __future__ import annotations

import re
from uuid import uuid4

from starlette.routing import Match

from halldyll_ray.serve.ingress import HOT_ROUTES, api

_SAMPLES = {"user_id": "me", "memory_id": str(uuid4()), "session_id": "s-1", "key_id": str(uuid4())}


def _api_routes() -> list:
    """The API's routes in the order the served app tries them (under serve.ingress's router)."""
    (router,) = [r for r in api.routes if hasattr(r, "original_router")]
    return list(router.original_router.routes)


def _concrete(path: str) -> str:
    """A request path for a route's template: sample values for its parameters."""
    path = path.replace("{ref:path}", "org/model-1")
    return re.sub(r"\{(\w+)\}", lambda m: _SAMPLES.get(m.group(1), str(uuid4())), path)


def test_the_hot_routes_are_tried_first_in_their_order() -> None:
    first = [(method, r.path) for r in _api_routes()[: len(HOT_ROUTES)] for method in r.methods]
    assert first == list(HOT_ROUTES)


def test_exactly_one_route_answers_each_route_request() -> None:
    # Then the order of the routes decides nothing but how soon the one that answers is found.
    routes = _api_routes()
    assert len(routes) > 30
    for route in routes:
        for method in route.methods:
            scope = {"type": "http", "method": method, "path": _concrete(route.path)}
            scope["root_path"] = ""
            full = [r for r in routes if r.matches(scope)[0] is Match.FULL]
            assert full == [route], (method, route.path, [r.path for r in full])
