"""schemathesis against the OpenAPI schema, over the ASGI app on SQLite: generated requests to
every operation (and, following the schema's links, create -> get/cancel/retry/artifacts)
never get a 5xx, and responses match the documented schemas. Examples are limited so the
whole module stays well under a minute."""

from __future__ import annotations

import shutil
import tempfile

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from jobs.auth import create_token, pepper
from jobs.db import session_scope, upgrade
from jobs.settings import Settings

pytestmark = pytest.mark.service
# The event stream of a job that no worker runs never ends; it has its own service tests.
EXCLUDED = {"job_events"}
# A JobSpec is checked beyond what JSON Schema says (bits allowed per method, group sizes,
# Hub id shapes): schema-valid bodies may rightly get a 422 naming the field.
SEMANTIC = [positive_data_acceptance]
FUZZ = hypothesis.settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def _app_and_token():
    # Built at import: schemathesis parametrizes the test from the schema at collection.
    settings = Settings(
        home=tempfile.mkdtemp(prefix="qf-openapi-"),
        hf_webhook_secret="hook-secret",
        webhook_secret="whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    )
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as s:
        token = create_token(s, pepper(settings), "fuzz", "submit,read,admin", "fuzz")[1]
    return create_app(settings), token, settings.home


APP, TOKEN, HOME = _app_and_token()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
schema = schemathesis.openapi.from_asgi("/openapi.json", APP).exclude(operation_id=list(EXCLUDED))


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(HOME, ignore_errors=True)


@schema.parametrize()
@FUZZ
def test_no_server_errors(case):
    case.call_and_validate(headers=AUTH, excluded_checks=SEMANTIC)


def test_stateful_links():
    base = schema.as_state_machine()

    class Machine(base):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case):
            return {"headers": AUTH}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, excluded_checks=SEMANTIC, transport_kwargs=kwargs)

    Machine.run(
        settings=hypothesis.settings(
            max_examples=10,
            stateful_step_count=4,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    )


def test_schema_documents_links_and_examples():
    doc = APP.openapi()
    create = doc["paths"]["/v1/jobs"]["post"]
    links = create["responses"]["201"]["links"]
    assert {"GetJob", "CancelJob", "RetryJob", "JobEvents"} <= set(links)
    assert links["GetJob"]["parameters"] == {"job_id": "$response.body#/id"}
    assert doc["components"]["schemas"]["JobSpec"]["examples"]
    assert {"HTTPBearer", "APIKeyCookie"} <= set(doc["components"]["securitySchemes"])
