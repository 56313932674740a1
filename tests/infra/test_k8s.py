"""infra/k8s: the manifests parse, validate against Kubernetes' own schemas, and agree with
each other and with Tally (ports, probes, settings, partitions), without a cluster.

Built-in kinds are validated (strictly: unknown fields fail) by `kubernetes-validate`, which
ships the Kubernetes JSON schemas; KEDA's kinds have no schema there and are checked here.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from core.settings import Settings
from schemas.api import LagReport

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
EXAMPLE_FILE = "secret.example.yaml"  # Secrets with placeholders, never applied
ROLE_PORT_FIELD = {"ingest": "ingest_port", "query": "query_port", "consume": "consumer_metrics_port"}
HTTP_ROLES = {"ingest", "query"}
# Not Tally's settings, read by its libraries: asyncpg's TLS for managed Postgres (docs/deployment.md).
LIBRARY_VARIABLES = {"PGSSLMODE", "PGSSLROOTCERT"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def kustomization() -> Doc:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


@pytest.fixture(scope="module")
def docs(kustomization: Doc) -> list[Doc]:
    """What `kubectl apply -k` applies: the listed resources (the example Secret is not one)."""
    return [doc for name in kustomization["resources"] for doc in load(K8S / name.split("#")[0].strip())]


@pytest.fixture(scope="module")
def example_secrets() -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in load(K8S / EXAMPLE_FILE)}


def of_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def config(docs: list[Doc]) -> dict[str, str]:
    (configmap,) = of_kind(docs, "ConfigMap").values()
    return {k: str(v) for k, v in configmap["data"].items()}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("TALLY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def pod_env(docs: list[Doc], example_secrets: dict[str, Doc]) -> dict[str, str]:
    return {**config(docs), **example_secrets["tally-secrets"]["stringData"]}


def container(workload: Doc) -> Doc:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(only)


def role(workload: Doc) -> str:
    return str(container(workload)["args"][0])


def port_number(c: Doc, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in c["ports"]), f"{c['name']} does not listen on {port}"
        return port
    (match,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(match)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_templates(docs: list[Doc]) -> dict[str, Doc]:
    return {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }


# --- Files, kustomization, schemas ----------------------------------------------------------


def test_every_document_parses_and_names_itself() -> None:
    for path in manifest_files():
        documents = load(path)
        assert documents, f"{path.name} is empty"
        for doc in documents:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: {doc.get('kind')}"
            assert DNS_1123.match(doc["metadata"]["name"]), f"{path.name}: {doc['metadata']['name']}"
            assert "namespace" not in doc["metadata"], "the kustomization sets the namespace"


def test_kustomization_lists_every_manifest_but_the_example_secret(kustomization: Doc) -> None:
    listed = [name.split("#")[0].strip() for name in kustomization["resources"]]
    assert sorted(listed) == sorted(p.name for p in manifest_files() if p.name != EXAMPLE_FILE)
    assert EXAMPLE_FILE not in listed, "placeholders must never be applied"
    assert kustomization["namespace"] == "tally"


def test_kustomize_builds(kustomization: Doc) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it comes from no registry .ci/run uses)")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {"tally"}
    (image,) = kustomization["images"]
    wanted = f"{image['newName']}:{image['newTag']}"
    assert {container(d)["image"] for d in built if d["kind"] in ("Deployment", "Job")} == {wanted}


KUBERNETES_VERSIONS = sorted({kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version()})


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_kinds_are_valid_kubernetes(version: str, example_secrets: dict[str, Doc], docs: list[Doc]) -> None:
    """Strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict` would."""
    checked = 0
    for doc in [*docs, *example_secrets.values()]:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        problem = None
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except jsonschema.ValidationError as error:  # the whole schema would drown the message
            problem = f"{error.message} at {'/'.join(str(p) for p in error.absolute_path)}"
        assert problem is None, f"{doc['kind']} {doc['metadata']['name']}: {problem}"
        checked += 1
    assert checked >= 12


def test_the_schema_check_catches_a_typo(docs: list[Doc]) -> None:
    deployment = copy.deepcopy(of_kind(docs, "Deployment")["tally-ingest"])
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.utils.latest_version(), strict=True)


# --- Workloads -------------------------------------------------------------------------


def test_one_deployment_per_role_and_a_migrate_job(docs: list[Doc]) -> None:
    deployments = of_kind(docs, "Deployment")
    assert {role(d) for d in deployments.values()} == {"ingest", "query", "consume"}
    (job,) = of_kind(docs, "Job").values()
    assert container(job)["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert job["spec"]["backoffLimit"] >= 1
    images = {container(d)["image"] for d in [*deployments.values(), job]}
    assert len(images) == 1, "one image for every role"


def test_selectors_match_their_pods(docs: list[Doc]) -> None:
    templates = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in of_kind(docs, "Deployment").items()}
    for name, deployment in of_kind(docs, "Deployment").items():
        assert selects(deployment["spec"]["selector"]["matchLabels"], templates[name]), name
        for others, labels in templates.items():
            if others != name:
                assert not selects(deployment["spec"]["selector"]["matchLabels"], labels), f"{name} selects {others}"
    for kind in ("Service", "PodDisruptionBudget"):
        for name, doc in of_kind(docs, kind).items():
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            matched = [d for d, labels in templates.items() if selects(selector, labels)]
            assert len(matched) == 1, f"{kind} {name} selects {matched}"


def test_services_reach_the_container_ports(
    docs: list[Doc], example_secrets: dict[str, Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(pod_env(docs, example_secrets), monkeypatch)
    deployments = of_kind(docs, "Deployment")
    services = of_kind(docs, "Service")
    assert {container(deployments[n])["args"][0] for n in services} == HTTP_ROLES, "a Service per API"
    for name, service in services.items():
        target = next(
            d
            for d in deployments.values()
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        )
        c = container(target)
        (port,) = service["spec"]["ports"]
        expected = getattr(settings, ROLE_PORT_FIELD[role(target)])
        assert port_number(c, port["targetPort"]) == expected, f"{name} forwards to a port Tally does not listen on"
        assert port["port"] == expected, f"{name}: the same port inside and outside, as in compose and nginx"


def test_probes_ask_readyz_and_healthz_on_the_tally_port(
    docs: list[Doc], example_secrets: dict[str, Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(pod_env(docs, example_secrets), monkeypatch)
    for name, deployment in of_kind(docs, "Deployment").items():
        c = container(deployment)
        expected_port = getattr(settings, ROLE_PORT_FIELD[role(deployment)])
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
            assert probe in c, f"{name} has no {probe}"
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{name}: {probe} asks {get['path']}"
            assert port_number(c, get["port"]) == expected_port, f"{name}: {probe} on the wrong port"
        # Liveness must not restart a pod that is merely unready (Kafka down, draining).
        assert c["livenessProbe"]["httpGet"]["path"] != "/readyz"


def test_termination_outlasts_prestop_drain_and_grace(
    docs: list[Doc], example_secrets: dict[str, Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(pod_env(docs, example_secrets), monkeypatch)
    for name, deployment in of_kind(docs, "Deployment").items():
        c = container(deployment)
        pre_stop = 0.0
        if role(deployment) in HTTP_ROLES:
            command = c["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "sleep", f"{name}: the preStop hook waits for endpoints to drop the pod"
            pre_stop = float(command[1])
            assert pre_stop > 0
        budget = pre_stop + settings.drain_seconds + settings.shutdown_grace_seconds
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= budget + 5, f"{name}: SIGKILL after {grace} s, the drain needs {budget} s and a flush"


def test_resources_requests_and_limits(docs: list[Doc]) -> None:
    units = {"": 1.0, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

    def quantity(value: str | int) -> float:
        number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|)", str(value)).groups()  # type: ignore[union-attr]
        return float(number) * units[unit]

    for name, template in pod_templates(docs).items():
        for c in template["spec"]["containers"]:
            resources = c["resources"]
            for kind in ("cpu", "memory"):
                request, limit = resources["requests"][kind], resources["limits"][kind]
                assert quantity(request) <= quantity(limit), f"{name}: {kind} request above its limit"


def test_pods_run_as_the_image_user_with_no_privileges(docs: list[Doc]) -> None:
    """What the namespace's `restricted` Pod Security level demands, and the Dockerfile's user."""
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    (namespace,) = of_kind(docs, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, template in pod_templates(docs).items():
        spec = template["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, f"{name} needs no Kubernetes API"
        for c in spec["containers"]:
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            if security.get("readOnlyRootFilesystem"):
                writable = [m["mountPath"] for m in c["volumeMounts"]]
                assert "/tmp" in writable, f"{name}: an emptyDir for /tmp"  # noqa: S108


# --- Settings and secrets --------------------------------------------------------------


def test_env_comes_from_the_configmap_and_the_secret(docs: list[Doc], example_secrets: dict[str, Doc]) -> None:
    configmaps, secrets = set(of_kind(docs, "ConfigMap")), set(example_secrets)
    for name, template in pod_templates(docs).items():
        for c in template["spec"]["containers"]:
            refs = [(next(iter(ref)), next(iter(ref.values()))["name"]) for ref in c["envFrom"]]
            assert refs == [("configMapRef", "tally-config"), ("secretRef", "tally-secrets")], name
            assert {n for kind, n in refs if kind == "configMapRef"} <= configmaps
            assert {n for kind, n in refs if kind == "secretRef"} <= secrets
            assert not c.get("env"), f"{name}: settings belong in the ConfigMap or the Secret"


def test_every_variable_is_a_setting_and_they_parse(
    docs: list[Doc], example_secrets: dict[str, Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {f"TALLY_{name.upper()}" for name in Settings.model_fields}
    env = pod_env(docs, example_secrets)
    assert {k for k in env if k.startswith("TALLY_")} - fields == set(), "variables Tally does not read"
    assert {k for k in env if not k.startswith("TALLY_")} <= LIBRARY_VARIABLES
    settings = settings_from(env, monkeypatch)
    settings.require("kafka_bootstrap", "postgres_url", "redis_url")
    settings.require_secrets()
    assert settings.env == "prod" and settings.auth
    assert settings.bind_host not in ("127.0.0.1", "localhost"), "a pod must listen beyond its loopback"
    assert settings.kafka_idempotence and settings.topic_replication >= 3, "a real cluster"


def test_secrets_are_placeholders_and_kept_out_of_the_configmap(
    docs: list[Doc], example_secrets: dict[str, Doc]
) -> None:
    for name, secret in example_secrets.items():
        assert secret["kind"] == "Secret"
        values = secret["stringData"]
        assert values and all("REPLACE_ME" in str(v) for v in values.values()), f"{name}: placeholders only"
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|POSTGRES_URL|REDIS_URL|SASL_USERNAME")
    leaked = [key for key in config(docs) if secretish.search(key)]
    assert not leaked, f"secrets in the ConfigMap: {leaked}"
    assert not of_kind(docs, "Secret"), "no Secret is applied by the kustomization"


# --- Autoscaling -------------------------------------------------------------------------


def test_hpas_scale_the_apis_on_cpu(docs: list[Doc]) -> None:
    deployments = of_kind(docs, "Deployment")
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    targets = {}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment") and ref["name"] in deployments, name
        targets[ref["name"]] = hpa
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], f"{name}: two replicas at least"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
        assert "cpu" in container(deployments[ref["name"]])["resources"]["requests"], "utilization needs a request"
    assert {role(deployments[n]) for n in targets} == HTTP_ROLES


# ScaledObject fields (keda.sh/v1alpha1, KEDA 2.13+).
SCALED_OBJECT_FIELDS = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
    "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
TRIGGER_FIELDS = {"type", "name", "metadata", "metricType", "useCachedMetrics", "authenticationRef"}


def test_keda_scales_consumers_on_lag_up_to_the_partition_count(
    docs: list[Doc], example_secrets: dict[str, Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployments = of_kind(docs, "Deployment")
    (scaled,) = of_kind(docs, "ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    # No schema for KEDA's kinds here: at least no misspelt field (KEDA would ignore it).
    assert set(spec) <= SCALED_OBJECT_FIELDS, set(spec) - SCALED_OBJECT_FIELDS
    assert all(set(t) <= TRIGGER_FIELDS for t in spec["triggers"])
    target = deployments[spec["scaleTargetRef"]["name"]]
    assert role(target) == "consume" and spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    partitions = settings_from(pod_env(docs, example_secrets), monkeypatch).topic_partitions
    assert spec["maxReplicaCount"] == partitions, "a consumer beyond the partition count has nothing to do"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["fallback"]["replicas"] <= partitions
    scaled_names = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler").values()}
    assert target["metadata"]["name"] not in scaled_names, "KEDA makes its own HPA; a second one would fight it"

    # The lag Tally's consumers have: Kafka's log end minus the offsets they store in Postgres.
    # KEDA's `kafka` trigger reads offsets committed to Kafka, which Tally never commits.
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api"
    meta = trigger["metadata"]
    assert meta["valueLocation"] in LagReport.model_fields
    assert int(meta["targetValue"]) > 0
    url = urlsplit(meta["url"])
    assert url.path == "/v1/ops/lag"
    service_name, namespace = url.hostname.split(".")[:2]  # type: ignore[union-attr]
    assert namespace == "tally"
    service = of_kind(docs, "Service")[service_name]
    assert url.port == service["spec"]["ports"][0]["port"]
    query = next(
        d
        for d in deployments.values()
        if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    )
    assert role(query) == "query"

    # /v1/ops/lag needs a key with the query scope: a bearer token from a Secret.
    assert meta["authMode"] == "bearer"
    auth = of_kind(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "token"
    assert ref["key"] in example_secrets[ref["name"]]["stringData"]


def test_disruption_budgets_leave_something_running(docs: list[Doc]) -> None:
    budgets = of_kind(docs, "PodDisruptionBudget")
    hpa_min = {
        h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"]
        for h in of_kind(docs, "HorizontalPodAutoscaler").values()
    }
    assert set(budgets) == set(of_kind(docs, "Deployment"))
    for name, budget in budgets.items():
        spec = budget["spec"]
        if "minAvailable" in spec:
            assert spec["minAvailable"] < hpa_min.get(name, 0), f"{name}: a budget that blocks every drain"
        else:
            assert spec["maxUnavailable"] == 1, name
