"""The chart, rendered by Helm: every object against the Kubernetes (and CRD) schemas, and what
the objects must say for the service to run as designed."""

from __future__ import annotations

import functools

import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import sqlalchemy as sa

from tests.deploy.conftest import CHART, RELEASE, by_kind, load_values, node_json, render

VALUE_SETS = ["default", "keda", "ingress", "two-queues", "production"]
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.25.0", kv_utils.latest_version()]
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
FULL = f"{RELEASE}-quantfoundry"

# kubernetes-validate reads and parses the (large) schema files on every call; they are the
# same files each time.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)


@functools.cache
def rendered(name: str) -> tuple[dict, ...]:
    return tuple(render(load_values(name)))


def pod_specs(objects) -> dict[str, dict]:
    """name -> pod spec of every Deployment and Job."""
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    }


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_is_clean(name):
    import helm_python as helm

    report = helm.lint(str(CHART), load_values(name), strict=True, kube_version="v1.30.0")
    findings = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not findings, findings


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_matches_its_schema(name, node_tools):
    objects = rendered(name)
    core = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
    crds = [o for o in objects if o["apiVersion"].startswith(CRD_GROUPS)]
    errors = []
    for version in KUBE_VERSIONS:
        for o in core:
            try:
                # strict: an unknown field (a typo the API server would drop) is an error.
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(map(str, e.path))
                errors.append(f"{version} {o['kind']}/{o['metadata']['name']}: {path}: {e.message}")
            except kv_utils.SchemaNotFoundError as e:
                errors.append(e.message)
    for o, result in zip(crds, node_json(node_tools, "validate_crds.mjs", stdin=crds), strict=True):
        if result is not None:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {result}")
    assert not errors, "\n".join(errors)
    expected_crds = {"keda": 2, "production": 4}.get(name, 0)
    assert len(crds) == expected_crds


def test_crd_validation_catches_a_broken_scaled_object(node_tools):
    """The CRD check is not vacuous: a wrongly typed ScaledObject is reported."""
    so = dict(by_kind(rendered("keda"), "ScaledObject")[f"{FULL}-worker-gpu-default"])
    so["spec"] = {**so["spec"], "minReplicaCount": "zero"}
    (result,) = node_json(node_tools, "validate_crds.mjs", stdin=[so])
    assert result and "minReplicaCount" in result


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_is_locked_down_and_sized(name):
    for pod_name, pod in pod_specs(rendered(name)).items():
        assert pod["automountServiceAccountToken"] is False, pod_name
        assert pod["securityContext"]["runAsNonRoot"] is True, pod_name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", pod_name
        for c in pod["containers"] + pod.get("initContainers", []):
            where = f"{pod_name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["runAsUser"] >= 10000, where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (where, part)
            # A read-only root needs somewhere to write: /tmp is always a volume.
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_are_references_only(name):
    objects = rendered(name)
    assert not by_kind(objects, "Secret"), "the chart must not create Secrets"
    for pod_name, pod in pod_specs(objects).items():
        for c in pod["containers"]:
            for var in c.get("env", []):
                if any(w in var["name"] for w in ("URL", "TOKEN", "PEPPER", "PASSWORD")):
                    assert "value" not in var, (pod_name, var)
                    assert "secretKeyRef" in var["valueFrom"], (pod_name, var)


def test_each_process_gets_only_its_secrets():
    pods = pod_specs(rendered("default"))
    env = {name: env_of(pod["containers"][0]) for name, pod in pods.items()}
    api, worker = env[f"{FULL}-api"], env[f"{FULL}-worker-gpu-default"]
    dispatcher, migrations = env[f"{FULL}-dispatcher"], env[f"{FULL}-migrations"]
    assert api["QF_TOKEN_PEPPER"]["valueFrom"]["secretKeyRef"] == {
        "name": "quantfoundry",
        "key": "token-pepper",
    }
    assert "QF_TOKEN_PEPPER" not in worker
    assert set(dispatcher) & {"QF_TOKEN_PEPPER", "QF_SECRETS_DIR"} == set()
    assert set(migrations) & {"QF_BROKER_URL", "QF_TOKEN_PEPPER", "QF_SECRETS_DIR"} == set()
    for e in (api, worker, dispatcher, migrations):
        assert e["QF_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "database-url"
    # Webhook secrets: the inbound Hub webhook's for the API, the callback signing key for the
    # API (it refuses callback_url without one) and the dispatcher (it signs and sends).
    assert api["QF_HF_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "hf-webhook-secret"
    for e in (api, dispatcher):
        ref = e["QF_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "quantfoundry", "key": "webhook-secret", "optional": True}
    assert {"QF_WEBHOOK_SECRET", "QF_HF_WEBHOOK_SECRET"} & (set(worker) | set(migrations)) == set()
    # The Hub token reaches the workers only, as the file a job names (workers/secrets.py reads
    # <QF_SECRETS_DIR>/<destination.token_secret>, default "hub-token").
    for name, pod in pods.items():
        has = any(v.get("projected") for v in pod["volumes"])
        assert has == ("-worker-" in name), name
    assert worker["QF_SECRETS_DIR"]["value"] == "/run/secrets"
    (source,) = worker_secret_sources(pods[f"{FULL}-worker-gpu-default"])
    assert source == {
        "name": "quantfoundry",
        "optional": False,
        "items": [{"key": "hub-token", "path": "hub-token"}],
    }


def worker_secret_sources(pod: dict) -> list[dict]:
    mount = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}["secrets"]
    assert mount["mountPath"] == "/run/secrets" and mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}["secrets"]["projected"]
    assert volume["defaultMode"] == 0o440
    return [s["secret"] for s in volume["sources"]]


def test_a_secret_entry_can_name_its_own_secret():
    values = load_values("production")
    values["secrets"]["workerSecrets"] = [
        {"name": "hub-token-acme", "existingSecret": "acme-hub", "key": "token"}
    ]
    pods = pod_specs(render(values))
    api = env_of(pods[f"{FULL}-api"]["containers"][0])
    assert api["QF_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "quantfoundry"
    hub, acme = worker_secret_sources(pods[f"{FULL}-worker-gpu-high"])
    assert hub["name"] == "quantfoundry-hub"
    assert acme == {"name": "acme-hub", "items": [{"key": "token", "path": "hub-token-acme"}]}


def test_one_worker_deployment_per_queue_with_its_hardware():
    objects = rendered("two-queues")
    deployments = by_kind(objects, "Deployment")
    workers = {n: d for n, d in deployments.items() if "-worker-" in n}
    assert set(workers) == {f"{FULL}-worker-{k}" for k in ("gpu-default", "gpu-high", "cpu-small")}

    def worker(key):
        d = workers[f"{FULL}-worker-{key}"]
        return d, d["spec"]["template"]["spec"], d["spec"]["template"]["spec"]["containers"][0]

    d, pod, c = worker("gpu-high")
    assert d["spec"]["replicas"] == 2
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    # A partial resources override merges with the defaults.
    assert c["resources"]["limits"]["memory"] == "128Gi"
    assert c["resources"]["requests"]["cpu"] == "4"
    assert env_of(c)["QF_QUEUE"]["value"] == "gpu-high"
    assert env_of(c)["QF_DEVICE"]["value"] == "cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "quantization", "effect": "NoSchedule"}
    ]
    assert pod["terminationGracePeriodSeconds"] == 3600
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["home"]["persistentVolumeClaim"]["claimName"] == "quantfoundry-home"
    assert "emptyDir" in volumes["hf-cache"]

    _, pod, c = worker("gpu-default")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(c)["QF_QUEUE"]["value"] == "gpu-default"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"

    # gpu: 0 is a CPU worker: no GPU limit, no GPU node selector or toleration.
    _, pod, c = worker("cpu-small")
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert env_of(c)["QF_DEVICE"]["value"] == "cpu"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "tolerations" not in pod
    assert pod["terminationGracePeriodSeconds"] == 600

    # Each queue's PodDisruptionBudget selects that queue's pods and no other.
    pdbs = by_kind(objects, "PodDisruptionBudget")
    for key in ("gpu-default", "gpu-high", "cpu-small"):
        sel = pdbs[f"{FULL}-worker-{key}"]["spec"]["selector"]["matchLabels"]
        matching = [
            n
            for n, w in workers.items()
            if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matching == [f"{FULL}-worker-{key}"]


def test_worker_shutdown_lets_the_running_job_finish():
    pod = pod_specs(rendered("default"))[f"{FULL}-worker-gpu-default"]
    c = pod["containers"][0]
    assert pod["terminationGracePeriodSeconds"] >= 3600
    hook = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    # SIGTERM to the Celery worker (PID 1) is its warm shutdown; the hook then waits.
    assert "kill -TERM 1" in hook and "while kill -0 1" in hook
    assert c["args"] == ["worker"]
    # The worker's writable places: the Hub cache and QF_HOME (checkpoints) are volumes.
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/var/cache/huggingface", "/var/lib/quantfoundry", "/dev/shm"} <= mounts
    assert env_of(c)["HF_HOME"]["value"] == "/var/cache/huggingface"
    config = by_kind(rendered("default"), "ConfigMap")[FULL]["data"]
    assert config["QF_HOME"] == "/var/lib/quantfoundry"


def test_migrations_run_as_a_hook_that_needs_nothing_of_the_release():
    objects = rendered("default")
    job = by_kind(objects, "Job")[f"{FULL}-migrations"]
    ann = job["metadata"]["annotations"]
    assert set(ann["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"] == ["db", "upgrade"]
    # At pre-install the chart's ConfigMap and ServiceAccount do not exist yet.
    assert "envFrom" not in c and "serviceAccountName" not in pod
    policy = by_kind(objects, "NetworkPolicy")[f"{FULL}-migrations"]
    weight = int(policy["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert weight < int(ann["helm.sh/hook-weight"]), "the Job's NetworkPolicy comes first"
    # Only the hook objects carry hook annotations: the workloads are ordinary resources.
    hooks = {
        o["metadata"]["name"]
        for o in objects
        if "helm.sh/hook" in o["metadata"].get("annotations", {})
    }
    assert hooks == {f"{FULL}-migrations"}


def test_migrations_can_be_turned_off():
    assert not by_kind(render({"migrations": {"enabled": False}}), "Job")


def test_api_service_probes_and_ingress():
    objects = rendered("ingress")
    dep = by_kind(objects, "Deployment")[f"{FULL}-api"]
    svc = by_kind(objects, "Service")[f"{FULL}-api"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["args"][:1] == ["serve"] and "0.0.0.0" in c["args"]
    # API processes per pod: one by default, `api.workers` when set.
    assert c["args"][-2:] == ["--workers", "1"]
    prod = by_kind(rendered("production"), "Deployment")[f"{FULL}-api"]
    assert prod["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--workers", "2"]
    # With the HPA on, the Deployment leaves replicas to it.
    assert "replicas" not in dep["spec"]
    hpa = by_kind(objects, "HorizontalPodAutoscaler")[f"{FULL}-api"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    ing = by_kind(objects, "Ingress")[f"{FULL}-api"]
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"][0]["secretName"] == "quantfoundry-tls"
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    assert not by_kind(rendered("default"), "Ingress")
    assert by_kind(rendered("default"), "Deployment")[f"{FULL}-api"]["spec"]["replicas"] == 2


def test_service_monitor_scrapes_the_api_service():
    objects = rendered("production")
    sm = by_kind(objects, "ServiceMonitor")[f"{FULL}-api"]
    svc = by_kind(objects, "Service")[f"{FULL}-api"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert not by_kind(rendered("default"), "ServiceMonitor")


def test_network_policies_select_every_pod_and_limit_traffic():
    objects = rendered("ingress")
    policies = list(by_kind(objects, "NetworkPolicy").values())
    for name, dep in {**by_kind(objects, "Deployment"), **by_kind(objects, "Job")}.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [
            p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(covering) == 1, name
        (policy,) = covering
        egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert {53, 5432} <= egress_ports, name
        if "-worker-" in name:
            assert 443 in egress_ports and policy["spec"]["ingress"] == []
        if name.endswith("-dispatcher"):
            assert policy["spec"]["ingress"] == [] and 443 not in egress_ports
        if name.endswith("-api"):
            (rule,) = policy["spec"]["ingress"]
            assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
            assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {
                "kubernetes.io/metadata.name": "ingress-nginx"
            }


def test_a_settings_change_rolls_the_pods():
    def checksum(objects):
        return by_kind(objects, "Deployment")[f"{FULL}-api"]["spec"]["template"]["metadata"][
            "annotations"
        ]["checksum/config"]

    assert checksum(rendered("default")) != checksum(render({"config": {"maxAttempts": 5}}))


def test_keda_scales_each_queue_on_its_jobs_in_the_database(tmp_path):
    objects = render(load_values("keda") | load_values("two-queues"))
    scaled = by_kind(objects, "ScaledObject")
    deployments = by_kind(objects, "Deployment")
    auth = by_kind(objects, "TriggerAuthentication")[f"{FULL}-postgres"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "connection", "name": "quantfoundry", "key": "keda-postgres-connection"}
    ]
    queries = {}
    for key in ("gpu-default", "gpu-high", "cpu-small"):
        so = scaled[f"{FULL}-worker-{key}"]
        target = so["spec"]["scaleTargetRef"]["name"]
        # KEDA owns the replica count: the Deployment must not fight it on every upgrade.
        assert "replicas" not in deployments[target]["spec"]
        assert so["spec"]["maxReplicaCount"] == 6 and so["spec"]["minReplicaCount"] == 0
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "postgresql"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert trigger["metadata"]["targetQueryValue"] == "1"
        queries[key] = trigger["metadata"]["query"]

    # Run the queries over the real schema (the project's migrations) with jobs in every state.
    from jobs.db import session_factory, upgrade
    from jobs.lifecycle import create_job
    from jobs.spec import JobSpec

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    placed = {
        "gpu-high": [
            "queued",
            "running",
            "cancelling",
            "retrying",
            "succeeded",
            "failed",
            "cancelled",
        ],
        "gpu-default": ["running", "succeeded"],
        "cpu-small": [],
    }
    with session_factory(url)() as session:
        for queue, states in placed.items():
            for state in states:
                job = create_job(session, JobSpec(model_id="org/model"), queue=queue)
                job.state = state
        session.commit()
        counts = {k: session.execute(sa.text(q)).scalar_one() for k, q in queries.items()}
    # Terminal jobs need no worker; every other state holds or awaits one.
    assert counts == {"gpu-high": 4, "gpu-default": 1, "cpu-small": 0}
