"""The review records over the server: the route in the OpenAPI schema, and a remote session's
`review()` equal to a local session's after prompts, propagation and a correction's refine."""

import pytest

from medsam2.errors import InputError
from remote_fixtures import AUTH, client, make_volume, server  # noqa: F401


def test_a_remote_review_is_the_local_one(model, client):
    volume = make_volume(slices=6)
    local, remote = model.open(volume), client.open(volume)
    for s in (local, remote):
        s.add_prompt(2, points=[[30, 30]], labels=[1])
        s.add_prompt(2, obj_id=2, box=[5, 5, 20, 20])
        list(s.propagate())
        s.add_prompt(4, points=[[34, 28]], labels=[0])
        list(s.propagate(start=4))
    want = local.review()
    assert len(want) == 12 and {r["source"] for r in want} == {"prompt", "propagated", "refined"}
    assert remote.review() == want
    assert remote.review(2) == local.review(2) == [r for r in want if r["obj_id"] == 2]
    remote.clear_prompts(4, 1)
    local.clear_prompts(4, 1)
    assert remote.review() == local.review()
    with pytest.raises(InputError, match="unknown object id 9"):
        remote.review(9)
    remote.reset()
    assert remote.review() == []


def test_the_review_route_is_in_the_schema(server):
    import httpx

    schema = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    route = schema["paths"]["/v1/sessions/{sid}/review"]["get"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Review")
    fields = schema["components"]["schemas"]["ReviewRecord"]["properties"]
    assert {"frame", "obj_id", "confidence", "object_score", "area", "change", "source", "flagged"} <= set(fields)
