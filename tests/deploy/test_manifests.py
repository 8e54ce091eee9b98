"""deploy/: the kustomizations render, built-in objects validate against the Kubernetes
schemas, objects of custom kinds carry the fields their projects require, and the pieces
agree with each other and with `loraplex serve` (labels, ports, names, shutdown timing)."""
from __future__ import annotations

import base64
import re
import shlex
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

KUBERNETES_VERSION = "1.31"  # the oldest release the manifests target (gRPC probes are GA since 1.27)
TRIAL, PRODUCTION = "overlays/cpu-trial", "overlays/gpu-production"
RENDERED = [TRIAL, PRODUCTION, "inference-gateway", "monitoring"]
# created out of band in production (deploy/overlays/gpu-production/kustomization.yaml says how)
EXTERNAL_SECRETS = {PRODUCTION: {"loraplex-secrets", "loraplex-s3"}}
BUILT_IN_GROUPS = {"", "apps", "policy", "rbac.authorization.k8s.io"}


def _obj(required: list[str], properties: dict, closed: bool = True) -> dict:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": not closed}


_STR, _INT = {"type": "string", "minLength": 1}, {"type": "integer"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_LABELS = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}
# The required fields and types of each custom kind, from the projects' CRDs: KEDA v2
# (keda.sh/v1alpha1 ScaledObject), the Gateway API Inference Extension v1.0 (InferencePool,
# InferenceObjective) and the Gateway API v1 (Gateway, HTTPRoute). Spec objects are closed,
# so a misspelt field fails here instead of being dropped by the API server.
CUSTOM_SPECS = {
    ("keda.sh/v1alpha1", "ScaledObject"): _obj(["scaleTargetRef", "triggers"], {
        "scaleTargetRef": _obj(["name"], {"apiVersion": _STR, "kind": _STR, "name": _STR, "envSourceContainerName": _STR}),
        "pollingInterval": _INT, "initialCooldownPeriod": _INT, "cooldownPeriod": _INT, "idleReplicaCount": _INT,
        "minReplicaCount": _INT, "maxReplicaCount": _INT, "fallback": {"type": "object"},
        "advanced": _obj([], {"restoreToOriginalReplicaCount": {"type": "boolean"},
                              "horizontalPodAutoscalerConfig": _obj([], {"name": _STR, "behavior": {"type": "object"}}),
                              "scalingModifiers": {"type": "object"}}),
        "triggers": {"type": "array", "minItems": 1, "items": _obj(["type", "metadata"], {
            "type": {"const": "prometheus"}, "name": _STR, "useCachedMetrics": {"type": "boolean"},
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "authenticationRef": _obj(["name"], {"name": _STR, "kind": _STR}),
            "metadata": _obj(["serverAddress", "query", "threshold"], {
                "serverAddress": {"type": "string", "pattern": "^https?://"}, "query": _STR,
                "threshold": {"type": "string", "pattern": r"^\d+(\.\d+)?$"},
                "activationThreshold": {"type": "string"}, "namespace": _STR}, closed=False)})},
    }),
    ("inference.networking.k8s.io/v1", "InferencePool"): _obj(["selector", "targetPorts", "endpointPickerRef"], {
        "selector": _obj(["matchLabels"], {"matchLabels": _LABELS}),
        "targetPorts": {"type": "array", "minItems": 1, "maxItems": 1, "items": _obj(["number"], {"number": _PORT})},
        "endpointPickerRef": _obj(["name"], {"group": {"type": "string"}, "kind": _STR, "name": _STR,
                                             "port": _obj(["number"], {"number": _PORT}),
                                             "failureMode": {"enum": ["FailOpen", "FailClose"]}}),
    }),
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): _obj(["poolRef"], {
        "priority": _INT,
        "poolRef": _obj(["name"], {"group": {"type": "string"}, "kind": _STR, "name": _STR}),
    }),
    ("gateway.networking.k8s.io/v1", "Gateway"): _obj(["gatewayClassName", "listeners"], {
        "gatewayClassName": _STR, "addresses": {"type": "array"}, "infrastructure": {"type": "object"},
        "listeners": {"type": "array", "minItems": 1, "items": _obj(["name", "port", "protocol"], {
            "name": _STR, "hostname": _STR, "port": _PORT, "protocol": _STR, "tls": {"type": "object"},
            "allowedRoutes": {"type": "object"}})},
    }),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): _obj([], {
        "parentRefs": {"type": "array", "items": _obj(["name"], {"group": {"type": "string"}, "kind": _STR,
                                                                 "namespace": _STR, "name": _STR, "sectionName": _STR,
                                                                 "port": _PORT})},
        "hostnames": {"type": "array"},
        "rules": {"type": "array", "items": _obj([], {
            "name": _STR, "matches": {"type": "array"}, "filters": {"type": "array"},
            "timeouts": _obj([], {"request": {"type": "string", "pattern": r"^\d+(h|m|s|ms)$"},
                                  "backendRequest": {"type": "string"}}),
            "backendRefs": {"type": "array", "items": _obj(["name"], {
                "group": {"type": "string"}, "kind": _STR, "name": _STR, "namespace": _STR, "port": _PORT,
                "weight": _INT, "filters": {"type": "array"}})}})},
    }),
}


def _group(obj: dict) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def _find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def _container(objects: list[dict], deployment: str) -> dict:
    return _find(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def _port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def _config_data(objects: list[dict]) -> dict[str, str]:
    return _find(objects, "ConfigMap", "loraplex-config")["data"]


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("directory", RENDERED)
def test_rendered_objects_validate(render, directory):
    objects = render(directory)
    assert objects
    for obj in objects:
        where = f"{directory}: {obj['kind']}/{obj['metadata']['name']}"
        if _group(obj) in BUILT_IN_GROUPS:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")
        else:
            schema = CUSTOM_SPECS.get((obj["apiVersion"], obj["kind"]))
            assert schema is not None, f"{where}: no field check for this custom kind"
            assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, where
            jsonschema.validate(obj["spec"], schema)


def test_custom_kind_checks_catch_a_missing_or_misspelt_field(render):
    pool = _find(render(PRODUCTION), "InferencePool", "loraplex")
    schema = CUSTOM_SPECS[("inference.networking.k8s.io/v1", "InferencePool")]
    jsonschema.validate(pool["spec"], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in pool["spec"].items() if k != "endpointPickerRef"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**pool["spec"], "targetPortNumber": 8000}, schema)  # the v1alpha2 field name


def test_built_in_validation_rejects_a_broken_deployment(render):
    deployment = _find(render(TRIAL), "Deployment", "loraplex")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("overlay", [TRIAL, PRODUCTION])
def test_selectors_find_the_server_pods(render, overlay):
    objects = render(overlay)
    deployment = _find(objects, "Deployment", "loraplex")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for selector in (_find(objects, "Service", "loraplex")["spec"]["selector"],
                     _find(objects, "PodDisruptionBudget", "loraplex")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    target = _find(objects, "ScaledObject", "loraplex")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "loraplex")
    # nothing else (the PostgreSQL pod, the endpoint picker) carries the server's labels
    others = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet") and o is not deployment]
    assert all(not pod_labels.items() <= o["spec"]["template"]["metadata"]["labels"].items() for o in others)


@pytest.mark.parametrize("overlay", [TRIAL, PRODUCTION])
def test_ports_flags_probes_and_service_agree(render, overlay):
    objects = render(overlay)
    deployment = _find(objects, "Deployment", "loraplex")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    flags = _flags(container["args"])
    assert int(flags["port"]) == _port(container, "grpc")
    assert int(flags["http-port"]) == _port(container, "http")
    assert int(flags["metrics-port"]) == _port(container, "metrics")
    assert flags["host"] == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == _port(container, "metrics")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == _port(container, "grpc"), probe  # grpc.health.v1
    names = {p["name"] for p in container["ports"]}
    for port in _find(objects, "Service", "loraplex")["spec"]["ports"]:
        assert port["targetPort"] in names and port["port"] == _port(container, port["targetPort"])


@pytest.mark.parametrize("overlay", [TRIAL, PRODUCTION])
def test_shutdown_fits_in_the_grace_period(render, overlay):
    """preStop sleep + --shutdown-grace must end before SIGKILL, and liveness must not kill
    a pod whose health is NOT_SERVING because it is draining."""
    pod = _find(render(overlay), "Deployment", "loraplex")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = int(command[1]) + float(_flags(container["args"])["shutdown-grace"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 5
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


@pytest.mark.parametrize("overlay", [TRIAL, PRODUCTION])
def test_references_resolve(render, overlay):
    objects = render(overlay)
    present = {(o["kind"], o["metadata"]["name"]) for o in objects}
    external = EXTERNAL_SECRETS.get(overlay, set())
    for workload in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
        pod = workload["spec"]["template"]["spec"]
        wanted = set()
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                wanted.add(("ConfigMap", volume["configMap"]["name"]))
            if "secret" in volume:
                wanted.add(("Secret", volume["secret"]["secretName"]))
            if "persistentVolumeClaim" in volume:
                wanted.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    wanted.add(("ConfigMap", source["configMapRef"]["name"]))
                if "secretRef" in source:
                    wanted.add(("Secret", source["secretRef"]["name"]))
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    wanted.add(("Secret", ref["name"]))
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in pod.get("volumes", [])} | {
                t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        missing = {ref for ref in wanted - present if not (ref[0] == "Secret" and ref[1] in external)}
        assert not missing, f"{workload['metadata']['name']} refers to objects not rendered: {missing}"


@pytest.mark.parametrize("overlay", [TRIAL, PRODUCTION])
def test_serve_accepts_the_container_arguments(render, overlay):
    """The Deployment's arguments, with $(VAR) expanded as the kubelet does, parse with
    `loraplex serve`'s own parser: no misspelt or missing flags."""
    from loraplex.server.api.serve import build_parser

    objects = render(overlay)
    container = _container(objects, "loraplex")
    env = dict(_config_data(objects))
    env.update({e["name"]: "postgresql://u:p@db/loraplex" for e in container.get("env", []) if "valueFrom" in e})
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    args = container["args"]
    undefined = {v for a in args for v in re.findall(r"\$\((\w+)\)", a)} - env.keys()
    assert not undefined, f"arguments use variables nothing defines: {undefined}"
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args]
    assert expanded[0] == "serve"
    parsed = build_parser().parse_args(expanded[1:])
    assert parsed.max_loras == int(env["LORAPLEX_MAX_LORAS"])
    assert parsed.store.startswith("postgresql://")


def test_trial_store_points_at_the_in_cluster_postgres(render):
    objects = render(TRIAL)
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    store = base64.b64decode(secrets["loraplex-secrets"]["data"]["store-url"]).decode()
    url = urlsplit(store)
    postgres = {k: base64.b64decode(v).decode() for k, v in
                next(s for n, s in secrets.items() if n.startswith("loraplex-postgres"))["data"].items()}
    assert url.scheme == "postgresql"
    assert (url.username, url.password, url.path.lstrip("/")) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])
    service = _find(objects, "Service", url.hostname)
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    statefulset = _find(objects, "StatefulSet", "loraplex-postgres")
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    # one ReadWriteOnce blob volume: every replica must land on one node (the PostgreSQL pod's)
    assert _find(objects, "PersistentVolumeClaim", "loraplex-blobs")["spec"]["accessModes"] == ["ReadWriteOnce"]
    affinity = _find(objects, "Deployment", "loraplex")["spec"]["template"]["spec"]["affinity"]["podAffinity"]
    term = affinity["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()


def test_production_runs_on_gpus_with_blobs_in_s3(render):
    objects = render(PRODUCTION)
    container = _container(objects, "loraplex")
    for bound in ("requests", "limits"):
        assert container["resources"][bound]["nvidia.com/gpu"] == "1"
    assert _config_data(objects)["LORAPLEX_BLOBS"].startswith("s3://")
    assert _config_data(objects)["LORAPLEX_DEVICE"] == "cuda"
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("PersistentVolumeClaim", "loraplex-blobs") not in kinds  # the bucket replaces the shared volume
    assert ("Secret", "loraplex-secrets") not in kinds  # the placeholder is never applied
    cache = _flags(container["args"])["blob-cache"]
    assert any(m["mountPath"] == cache and m["name"] == "blobs" for m in container["volumeMounts"])
    assert {"InferencePool", "Gateway", "HTTPRoute"} <= {o["kind"] for o in objects}


@pytest.mark.parametrize("overlay", [TRIAL, PRODUCTION])
def test_autoscaling_thresholds_follow_max_running(render, overlay):
    """The running-requests trigger scales out at 3/4 of what a replica runs at once."""
    objects = render(overlay)
    triggers = {t["name"]: t for t in _find(objects, "ScaledObject", "loraplex")["spec"]["triggers"]}
    max_running = int(_config_data(objects)["LORAPLEX_MAX_RUNNING"])
    assert float(triggers["running-requests"]["metadata"]["threshold"]) == max_running * 3 / 4
    scaled = _find(objects, "ScaledObject", "loraplex")["spec"]
    assert 1 < scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert _find(objects, "PodDisruptionBudget", "loraplex")["spec"]["maxUnavailable"] < scaled["minReplicaCount"]


# ----------------------------------------------------------------------------- routing


def test_inference_pool_routes_to_the_openai_port_and_its_picker(render):
    objects = render(PRODUCTION)
    pool = _find(objects, "InferencePool", "loraplex")["spec"]
    server = _container(objects, "loraplex")
    labels = _find(objects, "Deployment", "loraplex")["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    assert pool["targetPorts"] == [{"number": _port(server, "http")}]
    service = _find(objects, "Service", pool["endpointPickerRef"]["name"])
    epp = _container(objects, "loraplex-epp")
    epp_flags = _flags(epp["args"])
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == pool["endpointPickerRef"]["port"]["number"])
    assert _port(epp, service_port["targetPort"]) == int(epp_flags["grpc-port"])
    epp_deployment = _find(objects, "Deployment", "loraplex-epp")
    assert service["spec"]["selector"].items() <= epp_deployment["spec"]["template"]["metadata"]["labels"].items()
    # the picker scrapes loraplex's own metrics port and knows its pool
    assert int(epp_flags["model-server-metrics-port"]) == _port(server, "metrics")
    assert epp_flags["pool-name"] == "loraplex"
    assert epp_flags["pool-namespace"] == "$(NAMESPACE)"
    for probe in ("readinessProbe", "livenessProbe"):
        assert epp[probe]["grpc"]["port"] == int(epp_flags["grpc-health-port"])
    route = _find(objects, "HTTPRoute", "loraplex")["spec"]
    assert route["parentRefs"][0]["name"] == _find(objects, "Gateway", "loraplex")["metadata"]["name"]
    backends = [b for rule in route["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraplex"}]
    objective = _find(objects, "InferenceObjective", "interactive")["spec"]
    assert objective["poolRef"]["name"] == "loraplex"


def test_endpoint_picker_config_is_complete(render):
    objects = render(PRODUCTION)
    epp = _find(objects, "Deployment", "loraplex-epp")
    config_name = next(v["configMap"]["name"] for v in epp["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    mount = next(m["mountPath"] for m in epp["spec"]["template"]["spec"]["containers"][0]["volumeMounts"])
    config_file = _flags(epp["spec"]["template"]["spec"]["containers"][0]["args"])["config-file"]
    assert config_file.startswith(mount + "/")
    config = yaml.safe_load(_find(objects, "ConfigMap", config_name)["data"][config_file.rpartition("/")[2]])
    assert config["kind"] == "EndpointPickerConfig"
    assert config["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1"
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    used = {ref["pluginRef"] for profile in config["schedulingProfiles"] for ref in profile["plugins"]}
    assert used <= declared and "lora-affinity-scorer" in used and "max-score-picker" in used


def test_dockerfile_serves_the_ports_the_manifests_use(render, deploy_dir):
    text = (deploy_dir / "Dockerfile").read_text()
    exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE") for p in shlex.split(line)[1:]}
    container = _container(render(TRIAL), "loraplex")
    assert exposed == {p["containerPort"] for p in container["ports"]}
    uid = int(re.search(r"^USER (\d+)", text, re.MULTILINE)[1])
    assert _find(render(TRIAL), "Deployment", "loraplex")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_dockerfile_installs_from_the_lock_and_copies_every_package_folder(deploy_dir):
    """The image gets what scripts/install.sh gets: the locked versions with hashes, nothing
    resolved at build time, and every folder pyproject.toml maps into `loraplex`."""
    import tomllib

    text = (deploy_dir / "Dockerfile").read_text()
    repo = deploy_dir.parent
    assert "--require-hashes -r requirements/serve-shared.txt -r requirements/model.txt" in text
    assert (repo / "requirements" / "serve-shared.txt").is_file()
    package_dirs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {shlex.split(line)[1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line}
    for folder in package_dirs.values():
        assert any(folder == c or folder.startswith(c + "/") for c in copied), f"{folder} is not copied"
