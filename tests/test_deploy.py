"""deploy/: the Kubernetes manifests and the Grafana dashboard, checked offline.

Built-in kinds are validated against the Kubernetes API's JSON schemas (kubernetes-validate,
strict: unknown fields are errors); KEDA's and the Prometheus Operator's custom resources
against hand-written subsets of their CRD schemas (tests/schemas/, see its README). Then
the manifests are held to the code: probe paths answered by the real metrics endpoint, the
port, every environment variable a setting, the grace period longer than the shutdown
timeout, the queue KEDA watches the worker's default, the migration command a real one.
The dashboard's every PromQL expression is parsed and each metric it queries is one the
worker exports.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

try:
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader  # type: ignore[assignment]

from worker import __version__
from worker.config import SECRET_VARIABLES, Settings
from worker.metrics import Health, Metrics, MetricsServer

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "prompter-worker.json"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

#: The oldest Kubernetes release the manifests are meant for, and the newest the validator
#: knows: both must accept them.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
#: Custom resources, each checked against its CRD subset.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
}
MANIFEST_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
#: Applied on its own (the Job, before the worker) or not at all (the example Secrets).
NOT_IN_KUSTOMIZATION = {"migrate-job.yaml", "secrets.example.yaml"}

SETTING_ENVS = {f.metadata["env"]: f for f in Settings.fields()}
MEMORY_BUDGET_ENV = "PROMPTER_MAX_HELD_BYTES"
MIB = 1024 * 1024


@functools.cache
def _parsed(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(d for d in yaml.load_all(path.read_text(), Loader=SafeLoader) if d)


def documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of ``path``; copies, which a test may change."""
    return copy.deepcopy(list(_parsed(path)))


def all_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in MANIFEST_FILES:
        for doc in documents(path):
            yield path.name, doc


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for _, d in all_documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def deployment() -> dict[str, Any]:
    return one("Deployment", "prompter-worker")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(workload: dict[str, Any]) -> dict[str, str]:
    env = container(workload)["env"]
    assert all("value" in e for e in env), "every variable has a literal value"
    return {e["name"]: e["value"] for e in env}


def quantity_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    assert match, quantity
    return int(match[1]) * {None: 1, "Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB}[match[2]]


# --- schemas ------------------------------------------------------------------------------


def test_the_manifests_are_the_files_of_the_kustomization() -> None:
    """kustomization.yaml lists every manifest except the Job and the example Secrets, and
    each file it lists exists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    assert listed == {p.name for p in MANIFEST_FILES} - NOT_IN_KUSTOMIZATION


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_built_in_kinds_validate_against_the_kubernetes_schemas(version: str) -> None:
    """Every Deployment, Service, Job, PodDisruptionBudget, ServiceAccount and Secret is valid
    for the Kubernetes API (strict: an unknown or misspelled field is an error)."""
    checked = []
    for name, doc in all_documents():
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        checked.append(doc["kind"])
    assert set(checked) >= {
        "Deployment",
        "Service",
        "Job",
        "PodDisruptionBudget",
        "ServiceAccount",
        "Secret",
    }


def test_the_validator_catches_a_misspelled_field() -> None:
    """The strict schema check is not vacuous: a typo in the Deployment fails it."""
    doc = deployment()
    doc["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_custom_resources_validate_against_their_crd_schemas() -> None:
    """The KEDA ScaledObject and TriggerAuthentication and the ServiceMonitor are valid for
    their CRDs (required fields, types, no unknown field); no other kind is left unchecked."""
    kinds = set()
    for name, doc in all_documents():
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRD_SCHEMAS:
            continue
        errors = sorted(crd_validator(*key).iter_errors(doc), key=str)
        assert not errors, f"{name}: {doc['kind']}: {[e.message for e in errors]}"
        kinds.add(doc["kind"])
    assert kinds == {k for _, k in CRD_SCHEMAS}


def test_the_crd_schemas_catch_a_misspelled_field() -> None:
    """The CRD subsets are not vacuous: a ScaledObject with `maxReplicas` (not
    `maxReplicaCount`) or a trigger without metadata fails."""
    doc = one("ScaledObject")
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    typo = json.loads(json.dumps(doc))
    typo["spec"]["maxReplicas"] = typo["spec"].pop("maxReplicaCount")
    assert not validator.is_valid(typo)
    bare = json.loads(json.dumps(doc))
    del bare["spec"]["triggers"][0]["metadata"]
    assert not validator.is_valid(bare)


# --- the worker's Deployment against the code ---------------------------------------------


def test_every_environment_variable_is_a_setting_and_its_value_is_valid() -> None:
    """Each variable of the worker and the Job is a Settings variable (or the *_FILE form of
    a secret one), and the values pass the worker's own validation."""
    known = set(SETTING_ENVS) | {f"{name}_FILE" for name in SECRET_VARIABLES}
    for workload in (deployment(), one("Job")):
        env = env_of(workload)
        unknown = set(env) - known - {MEMORY_BUDGET_ENV}
        assert not unknown, unknown
        values = {k: v for k, v in env.items() if not k.endswith("_FILE")}
        Settings.from_env(values)  # raises ConfigError naming any invalid value


def test_the_memory_budget_is_a_setting() -> None:
    """PROMPTER_MAX_HELD_BYTES, set in the Deployment, is a setting the worker reads, and
    its value there is accepted as is."""
    value = env_of(deployment())[MEMORY_BUDGET_ENV]
    field = SETTING_ENVS[MEMORY_BUDGET_ENV]
    settings = Settings.from_env({MEMORY_BUDGET_ENV: value})
    assert getattr(settings, field.name) == int(value)


def test_memory_limit_holds_the_budget_with_room_for_the_process() -> None:
    """Memory request = limit = 512 MiB (the size a default worker is built to fit), and the
    byte budget of held messages is the default one (64 MiB): the worker's peak RSS is
    about the process's base, plus the budget, plus the decoded copies of the batches in
    flight (README, "Memory"), well inside the limit."""
    resources = container(deployment())["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "512Mi"
    budget = int(env_of(deployment())[MEMORY_BUDGET_ENV])
    assert budget == Settings().max_held_bytes == 64 * MIB
    assert 4 * budget <= quantity_bytes(resources["limits"]["memory"])


def test_probes_are_the_metrics_endpoints_on_the_metrics_port() -> None:
    """The liveness and readiness probes ask the real endpoint of worker/metrics.py, at the
    paths and port of the manifest: liveness follows the event loop, readiness the
    connections (200 when ready, 503 when not)."""
    c = container(deployment())
    env = env_of(deployment())
    port = next(p for p in c["ports"] if p["name"] == "metrics")
    assert str(port["containerPort"]) == env["PROMPTER_METRICS_PORT"]
    assert env["PROMPTER_METRICS_HOST"] == "0.0.0.0"  # the default, 127.0.0.1, is unreachable
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    assert live["port"] == ready["port"] == "metrics"

    health = Health()
    server = MetricsServer(Metrics(), health, "127.0.0.1", 0)
    server.start()
    try:

        def status(path: str) -> int:
            url = f"http://127.0.0.1:{server.port}{path}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status(live["path"]) == 200
        assert status(ready["path"]) == 503  # not connected yet
        health.broker_connected = health.database_ok = True
        health.consumers = 2
        assert status(ready["path"]) == 200
        health.stopping = True
        assert status(ready["path"]) == 503
        health.last_tick -= 3600  # a stuck event loop
        assert status(live["path"]) == 503
    finally:
        server.close()


def test_grace_period_is_longer_than_the_shutdown_timeout() -> None:
    """Kubernetes waits longer than the worker's own drain before SIGKILL."""
    env = env_of(deployment())
    default = SETTING_ENVS["PROMPTER_SHUTDOWN_TIMEOUT"].default
    timeout = float(env.get("PROMPTER_SHUTDOWN_TIMEOUT", default))
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > timeout + 5


def test_urls_come_from_secret_files() -> None:
    """DATABASE_URL and AMQP_URL are never literal values: *_FILE names a file of a Secret
    volume mounted read-only, one that the volume's items provide."""
    for workload in (deployment(), one("Job")):
        pod = workload["spec"]["template"]["spec"]
        c = container(workload)
        env = env_of(workload)
        assert not set(SECRET_VARIABLES) & set(env)
        files = {k: v for k, v in env.items() if k.endswith("_FILE")}
        assert "DATABASE_URL_FILE" in files
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in files.values():
            mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]
            item = path.removeprefix(mount["mountPath"] + "/")
            assert item in {i["path"] for i in secret["items"]}
    assert "AMQP_URL_FILE" in env_of(deployment())


def example_secrets() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"] for d in documents(K8S / "secrets.example.yaml")}


def secret_of(workload: dict[str, Any]) -> tuple[str, list[str]]:
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    return volume["secret"]["secretName"], [i["key"] for i in volume["secret"]["items"]]


def test_the_worker_logs_in_as_the_runtime_role_and_the_job_as_the_owner() -> None:
    """The worker's Secret (example) names the role of sql/runtime_role.sql; the migration
    Job reads another Secret, whose user is not that role; the keys the volumes mount exist."""
    role = re.search(r"\\set role (\w+)", (ROOT / "sql" / "runtime_role.sql").read_text())
    assert role
    secrets = example_secrets()
    worker_secret, worker_keys = secret_of(deployment())
    job_secret, job_keys = secret_of(one("Job"))
    assert worker_secret != job_secret
    assert set(worker_keys) <= set(secrets[worker_secret])
    assert set(job_keys) <= set(secrets[job_secret])
    worker_user = urllib.parse.urlsplit(secrets[worker_secret]["database-url"]).username
    owner_user = urllib.parse.urlsplit(secrets[job_secret]["database-url"]).username
    assert worker_user == role[1]
    assert owner_user != role[1]


def test_containers_run_as_the_image_user_without_privileges() -> None:
    """Non-root as the Dockerfile's uid, read-only root filesystem (a writable /tmp only),
    no privilege escalation, no capabilities, no service account token."""
    uid = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert uid
    for workload in (deployment(), one("Job")):
        pod = workload["spec"]["template"]["spec"]
        c = container(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(uid[1])
        assert pod["automountServiceAccountToken"] is False
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert writable == {"/tmp"}


def test_commands_and_image_are_the_worker_s() -> None:
    """The Deployment runs `run` and the Job `migrate`, both commands of the CLI, from the
    same image, tagged with the package's version."""
    from worker.cli import main

    worker, job = container(deployment()), container(one("Job"))
    assert worker["args"] == ["run"]
    assert job["args"] == ["migrate"]
    assert {worker["args"][0], job["args"][0]} <= set(main.commands)
    assert worker["image"] == job["image"] == f"prompter-worker:{__version__}"


def test_selectors_pick_the_worker_pods_and_never_the_migration() -> None:
    """Service, PodDisruptionBudget and ServiceMonitor select exactly the worker's pods (the
    Service by the pod labels, the ServiceMonitor by the Service's labels); the migration
    Job's pods match none of them."""
    d = deployment()
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    selector = d["spec"]["selector"]["matchLabels"]
    job_labels = one("Job")["spec"]["template"]["metadata"]["labels"]

    def matches(labels: dict[str, str], wanted: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in wanted.items())

    service = one("Service")
    for wanted in (
        selector,
        service["spec"]["selector"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert matches(pod_labels, wanted)
        assert not matches(job_labels, wanted)
    monitor = one("ServiceMonitor")
    assert matches(service["metadata"]["labels"], monitor["spec"]["selector"]["matchLabels"])


def test_metrics_port_is_the_same_everywhere() -> None:
    """The Service, the ServiceMonitor and the scrape annotations name the container's
    metrics port and the /metrics path; not-ready workers are still scraped."""
    c = container(deployment())
    port = next(p for p in c["ports"] if p["name"] == "metrics")
    service = one("Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "metrics"
    assert service_port["port"] == port["containerPort"]
    assert service["spec"]["publishNotReadyAddresses"] is True
    (endpoint,) = one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] == "/metrics"
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_keda_scales_the_deployment_on_the_live_queue() -> None:
    """The ScaledObject targets the worker's Deployment (which leaves `replicas` to it),
    with a RabbitMQ trigger on the worker's default live queue, authenticated through the
    TriggerAuthentication, whose Secret the example provides."""
    scaled = one("ScaledObject")
    d = deployment()
    assert "replicas" not in d["spec"]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", d["metadata"]["name"])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == Settings().queue
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert int(trigger["metadata"]["value"]) > 0
    auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    assert urllib.parse.urlsplit(example_secrets()[ref["name"]][ref["key"]]).scheme in (
        "amqp",
        "amqps",
    )


def test_disruption_budget_lets_one_worker_go_at_a_time() -> None:
    """maxUnavailable 1: a drain never takes every worker at once, and a single replica can
    still be evicted (a minAvailable of 1 would block the node drain)."""
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]


# --- the Grafana dashboard ------------------------------------------------------------------

#: Labels Prometheus adds to every target; any metric may be grouped by them.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
#: Grafana's variables, replaced by values of the right shape before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$job": "x"}


def exported() -> dict[str, set[str]]:
    """Every series name the worker exports (from its registry), with its label names (from
    the collectors: a labelled metric has no sample before its first use)."""
    metrics = Metrics()
    labels_of = {
        c._name: set(c._labelnames)
        for c in vars(metrics).values()
        if isinstance(c, MetricWrapperBase)
    }
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(family.type, [""]):
            names[family.name + suffix] = labels_of[family.name] | (
                {"le"} if suffix == "_bucket" else set()
            )
    return names


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def parse(expr: str) -> promql_parser.Expr:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return promql_parser.parse(expr)


def selectors(tree: promql_parser.Expr) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector in the expression."""
    found: list[tuple[str, set[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next(m.value for m in matchers if m.name == "__name__")
            found.append((name, {m.name for m in matchers if m.name != "__name__"}))

    promql_parser.walk(tree, pre_visit=visit)
    return found


def grouping(tree: promql_parser.Expr) -> set[str]:
    """Label names the expression aggregates by."""
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)

    promql_parser.walk(tree, pre_visit=visit)
    return labels


def test_every_dashboard_query_parses_and_queries_metrics_the_worker_exports() -> None:
    """Every panel's PromQL parses; each metric it selects is a series of worker.metrics,
    and each label it matches or groups by is one of that metric's labels, `le` of a
    histogram's buckets, or a label Prometheus gives every target."""
    series = exported()
    exprs = expressions()
    assert len(exprs) >= 15
    for title, expr in exprs:
        tree = parse(expr)
        used = selectors(tree)
        assert used, f"{title}: {expr} selects no metric"
        allowed = set(TARGET_LABELS)
        for name, matched in used:
            assert name in series, f"{title}: {name} is not exported by the worker"
            allowed |= series[name]
            assert matched <= allowed, f"{title}: {matched - allowed} on {name}"
        assert grouping(tree) <= allowed, f"{title}: grouping by {grouping(tree) - allowed}"


def test_the_metric_check_is_not_vacuous() -> None:
    """A query of a metric the worker does not export, or grouped by a label it does not
    have, is caught by the same functions the dashboard test uses."""
    series = exported()
    (name, _), *_ = selectors(parse('rate(prompter_events_stoerd_total{job=~"$job"}[5m])'))
    assert name not in series
    tree = parse("sum by (queue) (rate(prompter_events_rejected_total[5m]))")
    assert grouping(tree) == {"queue"}
    assert "queue" not in series["prompter_events_rejected_total"] | TARGET_LABELS
    assert "reason" in series["prompter_events_rejected_total"]


def test_the_dashboard_shows_what_operators_ask_for() -> None:
    """Throughput, batch sizes, commit latency, lag, rejections by reason, retries,
    reconnects, bytes held and readiness each have a query."""
    used = {name for _, expr in expressions() for name, _ in selectors(parse(expr))}
    for metric in (
        "prompter_events_stored_total",
        "prompter_batch_size_bucket",
        "prompter_commit_seconds_bucket",
        "prompter_event_lag_seconds_bucket",
        "prompter_events_rejected_total",
        "prompter_retries_total",
        "prompter_reconnects_total",
        "prompter_bytes_held",
        "prompter_ready",
    ):
        assert metric in used, metric
    rejected = [e for _, e in expressions() if "prompter_events_rejected_total" in e]
    assert any("by (reason)" in e for e in rejected)


def test_the_dashboard_is_importable() -> None:
    """A Grafana dashboard: a uid, panels on the grid with unique ids, each query on the
    Prometheus data source variable, whose job variable queries an exported metric."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    metric = re.fullmatch(r"label_values\((\w+), job\)", variables["job"]["definition"])
    assert metric
    assert metric[1] in exported()
