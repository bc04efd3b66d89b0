"""deploy/: the Kubernetes manifests, checked without a cluster.

Each document is validated against the Kubernetes API's own JSON schemas in
strict mode (unknown fields are errors), with kubernetes-validate, which ships
those schemas in its wheel and so works offline.  Then the manifests are
checked against each other and against the code: Services select pods that
exist and name ports they have, the probes use the front end's health routes,
the HPA follows a metric /metrics really exports, and every setting in the
ConfigMap and Secret is one that shared/config.py reads.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from frontend.metrics import BrokerCollector  # noqa: E402
from shared import protocol  # noqa: E402
from shared.config import describe  # noqa: E402

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES_VERSION = "1.30.0"  # the oldest release still commonly supported by cloud providers
# Environment variables that are not ours but are read by libraries in the image.
LIBRARY_ENV = {"HF_HOME"}


def load_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # a kustomize file, not a Kubernetes object
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


DOCUMENTS = load_documents()


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCUMENTS if doc["kind"] == kind}


def containers() -> list[dict]:
    return [c for d in by_kind("Deployment").values() for c in d["spec"]["template"]["spec"]["containers"]]


@pytest.mark.parametrize("source, doc", DOCUMENTS,
                         ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in DOCUMENTS])
def test_document_is_valid_kubernetes(source, doc):
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{source}: {err.message} at {list(err.path)}")


def test_kustomization_lists_every_file():
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def test_every_process_has_a_deployment():
    commands = {" ".join(c["command"]) for c in containers()}
    assert {"python -m broker", "python -m frontend", "python -m gpu_worker", "python -m preprocess_worker",
            "python -m batch_worker"} <= commands
    for single in ("moondream-broker", "moondream-batch-worker"):  # neither is replicated, nor doubled by an update
        assert by_kind("Deployment")[single]["spec"]["replicas"] == 1
        assert by_kind("Deployment")[single]["spec"]["strategy"] == {"type": "Recreate"}


def test_gpu_worker_requests_one_gpu():
    gpu = by_kind("Deployment")["moondream-gpu-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_frontend_probes_use_the_health_routes():
    front = by_kind("Deployment")["moondream-frontend"]["spec"]["template"]["spec"]["containers"][0]
    assert front["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert front["readinessProbe"]["httpGet"]["path"] == "/health"


def test_services_select_pods_and_ports_that_exist():
    deployments = by_kind("Deployment").values()
    for name, service in by_kind("Service").items():
        selector = service["spec"]["selector"].items()
        matched = [d for d in deployments if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} Deployments"
        port_names = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name}: no container port {port['targetPort']}"


def test_workers_and_front_ends_reach_the_broker_service():
    config = by_kind("ConfigMap")["moondream-config"]["data"]
    broker = by_kind("Service")["moondream-broker"]
    ports = {p["name"]: p["port"] for p in broker["spec"]["ports"]}
    assert config["BROKER_FRONTEND_ADDR"] == f"tcp://moondream-broker:{ports['frontends']}"
    assert config["BROKER_BACKEND_ADDR"] == f"tcp://moondream-broker:{ports['workers']}"
    assert config["BROKER_BACKEND_BIND"].startswith("tcp://0.0.0.0:")  # reachable from other pods


def test_settings_are_ones_the_code_reads():
    known = {env for env, _, _ in describe()} | LIBRARY_ENV
    secret = by_kind("Secret")["moondream-secrets"]["stringData"]
    assert "VLM_API_KEY" in set(secret)
    for key in [*by_kind("ConfigMap")["moondream-config"]["data"], *secret]:
        assert key in known, f"{key} is not a setting of shared/config.py"
    for container in containers():
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {"moondream-config", "moondream-secrets"}, container["name"]


def test_every_process_reads_the_curve_keys_where_the_config_says():
    """The broker's sockets leave the pod, so without keys every process would refuse to start."""
    keys_dir = by_kind("ConfigMap")["moondream-config"]["data"]["CURVE_KEYS_DIR"]
    for deployment in by_kind("Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert secrets.get(mounts.get(keys_dir)) == "moondream-curve-keys", container["name"]


def test_hpa_follows_a_metric_the_front_end_exports():
    hpa = by_kind("HorizontalPodAutoscaler")["moondream-gpu-worker"]
    assert hpa["spec"]["scaleTargetRef"]["name"] in by_kind("Deployment")
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]["name"]

    class Client:  # only status() is used by the collector
        def status(self, timeout):
            return protocol.Status("s", preprocess_workers=1, gpu_workers=1, gpu_ready=True)

    exported = {family.name for family in BrokerCollector(Client()).collect()}
    assert metric in exported
    rules = yaml.safe_load(by_kind("ConfigMap")["moondream-prometheus-adapter-rules"]["data"]["config.yaml"])
    assert rules["externalRules"][0]["name"]["as"] == metric


def test_batch_store_is_one_local_volume_shared_by_the_batch_worker_and_front_ends():
    """The batch worker and the front ends (which serve /v1/batch) open one SQLite store at
    BATCH_DATA_DIR: a ReadWriteOnce claim (no network filesystem), mounted there by both,
    with the front ends scheduled onto the batch worker's node."""
    data_dir = by_kind("ConfigMap")["moondream-config"]["data"]["BATCH_DATA_DIR"]
    claim = by_kind("PersistentVolumeClaim")["moondream-batch-data"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounting = {}
    for name, deployment in by_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])
                   if v.get("persistentVolumeClaim", {}).get("claimName") == "moondream-batch-data"}
        for container in pod["containers"]:
            paths = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in volumes]
            if paths:
                assert paths == [data_dir], name
                assert pod["securityContext"]["fsGroup"] == 1000, name  # the image's user writes there
                mounting[" ".join(container["command"])] = deployment
    assert set(mounting) == {"python -m batch_worker", "python -m frontend"}
    worker_labels = mounting["python -m batch_worker"]["spec"]["template"]["metadata"]["labels"]
    front = mounting["python -m frontend"]["spec"]["template"]["spec"]
    [term] = front["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= worker_labels.items()
