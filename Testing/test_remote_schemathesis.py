"""Schemathesis against a real `medsam2 serve` on 127.0.0.1: requests generated from the server's own
OpenAPI schema, bounded in examples and time. No answer may be a 5xx, every 4xx carries a
message, and the server's memory after the run stays within RSS_BOUND_MB of before.

Half the generated requests name a real session and volume, so the fuzzing reaches the engine.
"""

import sys
import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import medsam2  # noqa: E402
from medsam2.remote import wire  # noqa: E402
from remote_fixtures import AUTH, TOKEN, ServeProcess, make_volume  # noqa: E402

EXAMPLES = 60  # per operation
PROPAGATE_EXAMPLES = 12  # a valid one runs the engine over the volume (three axes when fused)
BUDGET_S = 75.0  # the whole run; examples past it are skipped
RSS_BOUND_MB = 150  # server memory after the run, over its memory before


class LiveSession:
    """A real session (with one prompt) for the generated requests to use; re-opened when closed."""

    def __init__(self, url):
        self.remote = medsam2.connect(url, token=TOKEN)
        self.volume = make_volume(slices=3, rows=12, cols=12, seed=61)
        self.digest = wire.volume_digest(self.volume)
        self.renew()

    def renew(self):
        self.session = self.remote.open(self.volume)
        self.prompt()

    def prompt(self):
        self.session.add_prompt(1, points=[[5, 5]], labels=[1])
        self.id = self.session.id

    def ready_to_propagate(self):
        """The generated requests reset and remove things: give the session its prompt back."""
        if not self.session.obj_ids or self.remote.request("GET", f"/v1/sessions/{self.id}", ok=(200, 404)
                                                           ).status_code == 404:
            self.session.close()
            self.renew()
        elif not self.remote.request("GET", f"/v1/sessions/{self.id}").json()["obj_ids"]:
            self.prompt()


def problems_with(case, response):
    """What is wrong with an answer (None: fine)."""
    status = response.status_code
    if status >= 500:
        return f"{status}: {response.text[:300]}"
    if 400 <= status < 500 and case.method.upper() != "HEAD":
        try:
            message = response.json().get("message")
        except (ValueError, AttributeError):
            message = None
        if not isinstance(message, str) or not message.strip():
            return f"{status} without a message: {response.text[:300]}"
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc (Linux)")
def test_requests_generated_from_the_openapi_schema_get_no_5xx_and_every_4xx_says_why(random_checkpoint, tmp_path):
    served = ServeProcess(random_checkpoint, tmp_path, args=["--max-upload-mb", "4", "--max-sessions", "6",
                                                             "--log-level", "warning"])
    found, calls = [], []
    try:
        live = LiveSession(served.url)
        schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
        before = served.rss_mb()
        deadline = time.monotonic() + BUDGET_S
        for result in schema.get_all_operations():
            operation = result.ok()
            examples = PROPAGATE_EXAMPLES if operation.path.endswith("/propagate") else EXAMPLES

            cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),  # fits the schema
                              operation.as_strategy(GenerationMode.NEGATIVE))  # does not

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=cases, real=st.booleans())
            def fuzz(case, real):
                if time.monotonic() > deadline:
                    return
                if real:  # aim at the real session and volume
                    if operation.path.endswith("/propagate"):
                        live.ready_to_propagate()
                    if "sid" in (case.path_parameters or {}):
                        case.path_parameters["sid"] = live.id
                    if "digest" in (case.path_parameters or {}):
                        case.path_parameters["digest"] = live.digest
                    if isinstance(case.body, dict) and "volume" in case.body:
                        case.body["volume"] = live.digest
                # the token is tested elsewhere: every generated request carries the right one
                case.headers = {**{k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"},
                                **AUTH}
                response = case.call(timeout=60)
                calls.append(1)
                problem = problems_with(case, response)
                if problem:
                    found.append(f"{case.method} {case.formatted_path}: {problem}")
                if case.method.upper() == "DELETE" and operation.path == "/v1/sessions/{sid}" \
                        and case.path_parameters.get("sid") == live.id and response.status_code == 204:
                    live.renew()

            fuzz()
        after = served.rss_mb()
        assert httpx.get(f"{served.url}/v1/health", timeout=10).status_code == 200
    finally:
        output = served.stop()
    assert not found, "\n".join(found[:20])
    assert len(calls) > 100, f"only {len(calls)} requests were made"
    assert "Traceback" not in output, output[-3000:]
    assert after - before < RSS_BOUND_MB, f"server RSS {before:.0f} -> {after:.0f} MiB over {len(calls)} requests"
