"""The KubeRay manifests in k8s/ validate offline: the RayService CRD schema, Ray's Serve schema, ServeConfig.

The CRD's openAPIV3Schema (KubeRay's published ray.io_rayservices.yaml, in k8s/crd/) is an OpenAPI v3
structural schema; it is turned into JSON Schema the way the API server reads it:

- `x-kubernetes-int-or-string: true` accepts an integer or a string (quantities like `4`, `"500m"`, ports);
- `nullable: true` also accepts null;
- objects with `properties` reject unknown fields, as `kubectl apply` does (server-side field validation is
  strict by default), unless `x-kubernetes-preserve-unknown-fields` keeps them; `additionalProperties` maps
  (labels, rayStartParams, resource lists) validate their values;
- `format: int32/int64` are range-checked. CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
import importlib
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dspark.serving.config import ServeConfig

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))
CRD_PATH = REPO / "k8s" / "crd" / "ray.io_rayservices.yaml"  # see k8s/crd/README.md
IMPORT_PATH = "deployments.dspark_app:build_app"
GRPC_SERVICER = "dspark.v1.dspark_pb2_grpc.add_DSparkServicer_to_server"

# ---- the CRD schema as JSON Schema ------------------------------------------------------------------------


def k8s_to_json_schema(node: Any) -> Any:
    """A copy of a Kubernetes structural (OpenAPI v3) schema that jsonschema reads as the API server does."""
    if isinstance(node, list):
        return [k8s_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: k8s_to_json_schema(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for name, bits in (("int32", 32), ("int64", 64)):

        def in_range(value: object, bits: int = bits) -> bool:
            if not isinstance(value, int) or isinstance(value, bool):
                return True  # formats constrain only values of their type
            return -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

        checker.checks(name)(in_range)
    return checker


@cache
def crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


@cache
def storage_version() -> dict:
    versions = [v for v in crd()["spec"]["versions"] if v.get("storage")]
    assert len(versions) == 1, "a CRD has exactly one storage version"
    assert versions[0]["name"] == "v1"
    return versions[0]


@cache
def validator() -> jsonschema.protocols.Validator:
    schema = k8s_to_json_schema(storage_version()["schema"]["openAPIV3Schema"])
    cls = jsonschema.Draft7Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=_format_checker())


def schema_errors(manifest: dict) -> list[str]:
    errors = sorted(validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ---- manifest helpers -------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert len(docs) == 1, f"{path.name}: one RayService per file"
    return docs[0]


def serve_config(manifest: dict) -> dict:
    text = manifest["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string, not a mapping"
    return yaml.safe_load(text)


def cluster(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterConfig"]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus_per_pod(group: dict) -> int:
    limits = (c.get("resources", {}).get("limits", {}) for c in containers(group))
    return sum(int(limit.get("nvidia.com/gpu", 0)) for limit in limits)


def cpus(quantity: int | str) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_cpus_per_pod(group: dict) -> float:
    """KubeRay's `ray start --num-cpus`: rayStartParams, else the Ray container's CPU limit (or request)."""
    if "num-cpus" in group.get("rayStartParams", {}):
        return float(group["rayStartParams"]["num-cpus"])
    resources = containers(group)[0].get("resources", {})
    return cpus(resources.get("limits", {}).get("cpu", resources.get("requests", {}).get("cpu", 0)))


def app_configs(manifest: dict) -> list[ServeConfig]:
    return [ServeConfig.model_validate(app["args"]) for app in serve_config(manifest)["applications"]]


def is_gpu_manifest(manifest: dict) -> bool:
    return any(cfg.num_gpus > 0 for cfg in app_configs(manifest))


@pytest.fixture(params=MANIFESTS, ids=lambda p: p.name)
def manifest(request) -> dict:
    return load(request.param)


# ---- positive checks --------------------------------------------------------------------------------------


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"rayservice.yaml", "rayservice-cpu.yaml"} <= names


def test_crd_schema_validates(manifest: dict):
    version = storage_version()
    assert manifest["apiVersion"] == f"{crd()['spec']['group']}/{version['name']}"
    assert manifest["kind"] == crd()["spec"]["names"]["kind"]
    assert schema_errors(manifest) == []


def test_object_meta(manifest: dict):
    """metadata is opaque to the CRD schema: the name is a DNS-1035 label (KubeRay derives Service names)."""
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    for group in [cluster(manifest)["headGroupSpec"], *cluster(manifest).get("workerGroupSpecs", [])]:
        for container in containers(group):
            for port in container.get("ports", []):
                name = port["name"]  # an IANA service name
                assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 15, name


def test_serve_config(manifest: dict):
    from ray.serve.schema import ServeDeploySchema

    values = serve_config(manifest)
    schema = ServeDeploySchema.model_validate(values)
    assert schema.http_options.port == 8000
    assert schema.grpc_options.port == 9000
    assert schema.grpc_options.grpc_servicer_functions == [GRPC_SERVICER]
    module, _, attr = GRPC_SERVICER.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attr))
    assert [app.name for app in schema.applications] == ["dspark"]
    for app in schema.applications:
        assert app.import_path == IMPORT_PATH
        cfg = ServeConfig.model_validate(app.args)
        assert cfg.autoscaling.min_replicas == 1 and cfg.autoscaling.max_replicas == 4
        assert cfg.engine.proposer == "hybrid"
        assert cfg.engine.verification.policy == "scheduler"


def test_app_builds(manifest: dict):
    """The application builder accepts each app's args (binds the deployment; starts no Ray cluster)."""
    from ray.serve import Application

    module, _, attr = IMPORT_PATH.partition(":")
    build_app = getattr(importlib.import_module(module), attr)
    for app in serve_config(manifest)["applications"]:
        assert isinstance(build_app(app["args"]), Application)


def test_cluster_layout(manifest: dict):
    spec = cluster(manifest)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0", "the head runs no model work"
    assert params["dashboard-host"] == "0.0.0.0"
    metrics_port = int(params["metrics-export-port"])
    head_ports = {p["containerPort"] for c in containers(head) for p in c.get("ports", [])}
    assert {8000, 9000, 8265, metrics_port} <= head_ports
    assert metrics_port == 8080
    serve_ports = {p["port"] for p in manifest["spec"]["serveService"]["spec"]["ports"]}
    values = serve_config(manifest)
    assert {values["http_options"]["port"], values["grpc_options"]["port"]} <= serve_ports
    assert all(
        group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        for group in spec["workerGroupSpecs"]
    )
    assert any(gpus_per_pod(group) == 0 for group in spec["workerGroupSpecs"]), "a CPU worker group"


def test_capacity_reaches_max_replicas(manifest: dict):
    """At their maxReplicas, the worker groups hold autoscaling.max_replicas replicas' CPUs and GPUs."""
    workers = cluster(manifest)["workerGroupSpecs"]
    cpu_capacity = sum(ray_cpus_per_pod(g) * g["maxReplicas"] for g in workers)
    gpu_capacity = sum(gpus_per_pod(g) * g["maxReplicas"] for g in workers)
    for cfg in app_configs(manifest):
        replicas = cfg.autoscaling.max_replicas
        cpu_need = cfg.tensor_parallel_size * cfg.num_cpus
        gpu_need = cfg.tensor_parallel_size * cfg.num_gpus
        if cfg.drafter_placement == "disaggregated":
            cpu_need += cfg.drafter_num_cpus
            gpu_need += cfg.drafter_num_gpus
        assert cpu_capacity >= replicas * cpu_need
        assert gpu_capacity >= replicas * gpu_need


def test_gpu_manifest():
    gpu = [m for m in map(load, MANIFESTS) if is_gpu_manifest(m)]
    assert gpu, "a GPU variant exists"
    for manifest in gpu:
        groups = cluster(manifest)["workerGroupSpecs"]
        gpu_groups = [g for g in groups if gpus_per_pod(g) > 0]
        assert gpu_groups, "a worker group requests nvidia.com/gpu"
        assert gpus_per_pod(cluster(manifest)["headGroupSpec"]) == 0
        for cfg in app_configs(manifest):
            assert cfg.tensor_parallel_size == 2 and cfg.num_gpus == 1
            assert cfg.drafter_placement == "disaggregated" and cfg.drafter_num_gpus == 0
            # one replica's ranks fit in one pod: NCCL over NVLink/shared memory, not across nodes
            assert max(map(gpus_per_pod, gpu_groups)) >= cfg.tensor_parallel_size * cfg.num_gpus
        for group in gpu_groups:
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)


def test_cpu_manifest():
    manifest = load(REPO / "k8s" / "rayservice-cpu.yaml")
    spec = cluster(manifest)
    assert all(gpus_per_pod(g) == 0 for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]])
    for cfg in app_configs(manifest):
        assert cfg.tensor_parallel_size == 1 and cfg.num_gpus == 0
        assert cfg.drafter_placement == "colocated" and cfg.num_cpus == 2


def _probe_command(container: dict, kind: str) -> str:
    probe = container.get(kind)
    assert probe is not None, f"{container['name']} has no {kind}"
    assert set(probe) & {"exec", "httpGet", "tcpSocket", "grpc"}, (
        f"{kind} of {container['name']} checks nothing"
    )
    if "httpGet" in probe:
        return f"http://localhost:{probe['httpGet']['port']}{probe['httpGet']['path']}"
    return " ".join(probe["exec"]["command"])


def _patience_s(probe: dict) -> int:
    """How long a probe keeps failing before Kubernetes acts (defaults as the API server sets them)."""
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_probes(manifest: dict):
    """Every Ray container has readiness and liveness probes. The head: raylet and GCS health. Workers: ready
    while the raylet and their Serve proxy answer (on the configured HTTP port), out of the Service at the
    first failure; alive while the raylet answers (a proxy problem must not restart a pod). Liveness waits
    far longer than readiness before it acts."""
    http_port = serve_config(manifest)["http_options"]["port"]
    spec = cluster(manifest)
    for container in containers(spec["headGroupSpec"]):
        for kind in ("readinessProbe", "livenessProbe"):
            command = _probe_command(container, kind)
            assert "api/local_raylet_healthz" in command and "api/gcs_healthz" in command
            assert "-/healthz" not in command, "the head's proxy is checked by the RayService controller"
        assert _patience_s(container["livenessProbe"]) > _patience_s(container["readinessProbe"])
    for group in spec["workerGroupSpecs"]:
        for container in containers(group):
            ready, alive = (
                _probe_command(container, "readinessProbe"),
                _probe_command(container, "livenessProbe"),
            )
            assert "api/local_raylet_healthz" in ready and f"localhost:{http_port}/-/healthz" in ready
            assert container["readinessProbe"]["failureThreshold"] == 1
            assert "api/local_raylet_healthz" in alive and "-/healthz" not in alive
            assert _patience_s(container["livenessProbe"]) >= 300


# ---- the validator is not vacuous -------------------------------------------------------------------------


def _gpu_group(m: dict) -> dict:
    return next(g for g in cluster(m)["workerGroupSpecs"] if gpus_per_pod(g) > 0)


def _set_replicas(m: dict) -> None:
    _gpu_group(m)["replicas"] = "two"


def _unknown_spec_field(m: dict) -> None:
    m["spec"]["serveConfig"] = {"importPath": IMPORT_PATH}  # the removed v1alpha1 field


def _missing_group_name(m: dict) -> None:
    del _gpu_group(m)["groupName"]


def _bad_enum(m: dict) -> None:
    cluster(m)["autoscalerOptions"]["upscalingMode"] = "Fast"


def _bad_quantity(m: dict) -> None:
    containers(_gpu_group(m))[0]["resources"]["limits"]["nvidia.com/gpu"] = "two GPUs"


def _float_quantity(m: dict) -> None:
    containers(_gpu_group(m))[0]["resources"]["limits"]["cpu"] = 7.5  # int-or-string: no floats


def _string_container_port(m: dict) -> None:
    containers(cluster(m)["headGroupSpec"])[0]["ports"][0]["containerPort"] = "6379"


def _port_out_of_int32(m: dict) -> None:
    containers(cluster(m)["headGroupSpec"])[0]["ports"][0]["containerPort"] = 2**31


def _non_string_start_param(m: dict) -> None:
    cluster(m)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _probe_field_typo(m: dict) -> None:
    containers(_gpu_group(m))[0]["readinessProbe"]["exec"]["cmd"] = ["true"]


def _string_probe_threshold(m: dict) -> None:
    containers(cluster(m)["headGroupSpec"])[0]["livenessProbe"]["failureThreshold"] = "120"


def _serve_config_as_mapping(m: dict) -> None:
    m["spec"]["serveConfigV2"] = serve_config(m)


BROKEN = [
    _set_replicas,
    _unknown_spec_field,
    _missing_group_name,
    _bad_enum,
    _bad_quantity,
    _float_quantity,
    _string_container_port,
    _port_out_of_int32,
    _non_string_start_param,
    _probe_field_typo,
    _string_probe_threshold,
    _serve_config_as_mapping,
]


@pytest.mark.parametrize("mutate", BROKEN, ids=lambda f: f.__name__.strip("_"))
def test_schema_rejects(mutate):
    manifest = copy.deepcopy(load(REPO / "k8s" / "rayservice.yaml"))
    assert schema_errors(manifest) == []
    mutate(manifest)
    assert schema_errors(manifest), f"{mutate.__name__}: the schema accepted a broken manifest"


def test_int_or_string_accepts_both():
    manifest = copy.deepcopy(load(REPO / "k8s" / "rayservice.yaml"))
    resources = containers(_gpu_group(manifest))[0]["resources"]["limits"]
    resources["cpu"], resources["nvidia.com/gpu"] = 8, "2"
    service_port = manifest["spec"]["serveService"]["spec"]["ports"][0]
    service_port["targetPort"] = "serve"  # a named container port
    assert schema_errors(manifest) == []


def test_bad_args_are_rejected():
    manifest = load(REPO / "k8s" / "rayservice.yaml")
    args = copy.deepcopy(serve_config(manifest)["applications"][0]["args"])
    args["tensor_paralel_size"] = 2
    with pytest.raises(ValueError, match="extra"):
        ServeConfig.model_validate(args)


def test_ray_workers_run_at_the_nodes_priority(manifest):
    """Ray's default worker niceness (15) makes the engine replicas yield to Ray's own processes; every Ray
    container (head and workers) sets RAY_worker_niceness=0 for the raylet it starts."""
    groups = [cluster(manifest)["headGroupSpec"], *cluster(manifest)["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e.get("value") for e in containers(group)[0].get("env", [])}
        assert env.get("RAY_worker_niceness") == "0"
