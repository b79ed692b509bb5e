"""values.schema.json, as Helm applies it: every file of bad_values/ is refused with an error
that names the offending value, and every value set of values/ is accepted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import CHART, HERE, render

BAD = sorted((HERE / "bad_values").glob("*.yaml"))
GOOD = sorted((HERE / "values").glob("*.yaml"))


def expected_message(path: Path) -> str:
    m = re.match(r"# expect: (.+)", path.read_text())
    assert m, f"{path.name} must start with '# expect: <part of the error>'"
    return m.group(1).strip()


def test_the_schema_is_valid_draft_07():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)


def test_there_are_enough_bad_value_files():
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_helm_refuses_bad_values(path):
    import helm_python as helm

    values = yaml.safe_load(path.read_text())
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert expected_message(path) in str(err.value), str(err.value)


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_helm_accepts_the_value_sets(path):
    assert render(yaml.safe_load(path.read_text()) or {})


def test_defaults_hold_no_credentials():
    """values.yaml names Secrets; nothing in it looks like a credential or a URL with one."""
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    leaves = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        else:
            leaves.append((path, node))

    walk(values, "")
    for path, value in leaves:
        if isinstance(value, str):
            assert "://" not in value, path
            assert not re.match(r"^(hf_|sk-|ghp_)", value), path
    secret_fields = {p for p, _ in leaves if p.startswith(".secrets.")}
    assert all(p.endswith((".existingSecret", ".key", ".optional")) for p in secret_fields)
