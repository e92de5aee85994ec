"""cluster/k8s and cluster/Dockerfile: every manifest validates against the schema the API server applies
(KubeRay's own CRDs for RayCluster / RayJob, Kubernetes' OpenAPI for the rest), the RayJobs own a cluster
that their deadline takes down, carat's invariants hold in every Ray pod (shared storage, token auth, a
/dev/shm large enough for the loader, configurations that load through carat), and the image has one CUDA."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from carat.config import load_config
from carat.data.sources.segment import FEATURE_DIMS

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
# KubeRay's CRDs, laid beside the checkout (its README.md): 1.5.1 is the oldest release the manifests
# support (authOptions appears there), 1.7.0 a current one.
KUBERAY = Path(__file__).resolve().parents[2] / "shared/data/kuberay"
KUBERAY_RELEASES = ("v1.5.1", "v1.7.0")
RAY_KINDS = ("RayCluster", "RayJob")
RAYJOBS = ("rayjob-train.yaml", "rayjob-tune.yaml")
CLUSTER_SPECS = ("raycluster.yaml",) + RAYJOBS


# -- the manifests -------------------------------------------------------------------------------------------
def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def all_k8s() -> dict[str, list[dict]]:
    return {p.name: docs(p.name) for p in sorted(K8S.glob("*.yaml"))}


def one(kind: str) -> dict:
    found = [d for ds in all_k8s().values() for d in ds if d["kind"] == kind]
    assert found, f"no {kind} in cluster/k8s"
    return found[0]


def cluster_spec(name: str) -> dict:
    """The RayCluster spec a file brings up: raycluster.yaml's own, or a RayJob's rayClusterSpec."""
    (doc,) = docs(name)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def quantity_bytes(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, text
    return float(match.group(1)) * units.get(match.group(2), 1)


def configmap_tomls() -> dict[str, str]:
    return one("ConfigMap")["data"]


def load_configmap_toml(key: str, tmp_path: Path):
    path = tmp_path / key
    path.write_text(configmap_tomls()[key])
    return load_config(file=path)


# -- schema validation ---------------------------------------------------------------------------------------
# A CRD's schema is a structural OpenAPI v3 schema; the API server reads it with rules JSON Schema leaves
# implicit. json_schema() makes them explicit so that jsonschema applies them too.
EMBEDDED_RESOURCE_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                            "metadata": {"type": "object"}}


def is_object_schema(node: dict) -> bool:
    return node.get("type") == "object" or "properties" in node


def json_schema(node: dict) -> dict:
    """One node of a structural schema as JSON Schema: a field the schema does not name is an error (the API
    server would drop it) unless x-kubernetes-preserve-unknown-fields; x-kubernetes-int-or-string takes an
    integer or a string; x-kubernetes-embedded-resource is an object with apiVersion, kind and metadata;
    nullable admits null."""
    nested = ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf")
    out = {k: v for k, v in node.items() if k not in nested}
    if "properties" in node:
        out["properties"] = {name: json_schema(sub) for name, sub in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = json_schema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = json_schema(node["additionalProperties"])
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [json_schema(sub) for sub in node[key]]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        out["type"] = "object"
        out["properties"] = {**EMBEDDED_RESOURCE_FIELDS, **out.get("properties", {})}
        out["required"] = sorted(set(out.get("required", [])) | {"apiVersion", "kind"})
    keeps_unknown = node.get("x-kubernetes-preserve-unknown-fields")
    if is_object_schema(out) and "additionalProperties" not in node and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def cel_rules_unchecked(validator, rules, instance, schema):
    # CEL (x-kubernetes-validations) needs the API server; a field carrying such rules fails here rather than
    # passing unchecked. carat's manifests use none of them (deletionStrategy, managedBy, ...).
    unchecked = [rule["rule"] for rule in rules]
    yield jsonschema.ValidationError(f"carries CEL rules this offline check cannot evaluate: {unchecked}")


def list_entries_unique(validator, list_type, instance, schema):
    # The API server rejects duplicates in a list-type=set list, and duplicate keys in a list-type=map list.
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    entries = instance if list_type == "set" else [[item.get(k) for k in keys] for item in instance]
    seen = [json.dumps(entry, sort_keys=True) for entry in entries]
    duplicates = sorted({s for s in seen if seen.count(s) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate entries in a list-type={list_type} list: {duplicates}")


StructuralValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-kubernetes-validations": cel_rules_unchecked, "x-kubernetes-list-type": list_entries_unique},
)


def kuberay_dir() -> Path:
    if not KUBERAY.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (shared/data/kuberay beside the checkout)")
    return KUBERAY


@functools.cache
def crd_schema(release: str, kind: str, api_version: str) -> dict:
    """The JSON Schema for `kind` at `api_version` in a KubeRay release's CRD; an apiVersion the CRD does not
    serve fails like the API server would."""
    crd = yaml.load((kuberay_dir() / release / f"ray.io_{kind.lower()}s.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, _, version = api_version.partition("/")
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert group == crd["spec"]["group"] and version in served, f"{kind} {api_version} is not served by {release}"
    schema = json_schema(served[version]["schema"]["openAPIV3Schema"])
    # The API server checks a custom resource's metadata as ObjectMeta, not with the CRD schema's bare
    # `type: object`: object_meta_errors does that.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def kubernetes_errors(doc: dict) -> list[str]:
    """Kubernetes' own OpenAPI schema for a built-in kind (strict: unknown fields are errors), as shipped by
    kubernetes-validate for the newest Kubernetes it knows."""
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    return []


def object_meta_errors(meta: dict) -> list[str]:
    # ObjectMeta is the same schema in every kind: borrow a ConfigMap's envelope to check it.
    return [f"metadata.{e}" for e in kubernetes_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta})]


def crd_errors(doc: dict, release: str) -> list[str]:
    validator = StructuralValidator(crd_schema(release, doc["kind"], doc["apiVersion"]))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + object_meta_errors(doc["metadata"])


def manifest_errors(doc: dict, release: str) -> list[str]:
    return crd_errors(doc, release) if doc["kind"] in RAY_KINDS else kubernetes_errors(doc)


@pytest.fixture
def offline(monkeypatch):
    """The validators must work without a network: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("schema validation tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def rayjob_train() -> dict:
    return copy.deepcopy(docs("rayjob-train.yaml")[0])


# -- every manifest is valid ---------------------------------------------------------------------------------
def test_k8s_has_the_documented_manifests():
    files = all_k8s()
    assert set(files) == {"raycluster.yaml", "configmap.yaml", "storage.yaml", *RAYJOBS}
    readme = (CLUSTER / "README.md").read_text()
    assert all(f"k8s/{name}" in readme for name in files), "cluster/README.md's table names every manifest"


@pytest.mark.parametrize("release", KUBERAY_RELEASES)
def test_ray_manifests_validate_against_kuberays_crds(release, offline):
    checked = 0
    for name, documents in all_k8s().items():
        for doc in documents:
            if doc["kind"] in RAY_KINDS:
                assert manifest_errors(doc, release) == [], name
                checked += 1
    assert checked == 3


def test_other_manifests_validate_against_kubernetes_openapi(offline):
    kinds = set()
    for name, documents in all_k8s().items():
        for doc in documents:
            if doc["kind"] not in RAY_KINDS:
                assert manifest_errors(doc, KUBERAY_RELEASES[0]) == [], name
                kinds.add(doc["kind"])
    assert kinds == {"PersistentVolumeClaim", "ConfigMap"}


def test_a_kind_kubernetes_does_not_know_is_not_waved_through(offline):
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_errors({"apiVersion": "v1", "kind": "RayJobb", "metadata": {"name": "x"}})


# -- a broken manifest fails ---------------------------------------------------------------------------------
def worker_container(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def break_field_name(job):
    worker_container(job)["volumeMount"] = worker_container(job).pop("volumeMounts")  # a typo kubectl would drop


def break_spec_field(job):
    job["spec"]["activeDeadline"] = 3600


def break_deadline_type(job):
    job["spec"]["activeDeadlineSeconds"] = "2 days"


def break_replicas_type(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"


def break_cpu_quantity(job):
    worker_container(job)["resources"]["limits"]["cpu"] = "lots"


def break_cpu_type(job):
    worker_container(job)["resources"]["limits"]["cpu"] = 3.5  # int-or-string: neither


def break_duplicate_port(job):
    ports = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append(dict(ports[0], name="again"))


def break_metadata(job):
    job["metadata"]["labelz"] = {"app": "carat"}


@pytest.mark.parametrize("release", KUBERAY_RELEASES)
@pytest.mark.parametrize(("breakage", "expected"), [
    (break_field_name, "'volumeMount' was unexpected"),
    (break_spec_field, "'activeDeadline' was unexpected"),
    (break_deadline_type, "'2 days' is not of type 'integer'"),
    (break_replicas_type, "'2' is not of type 'integer'"),
    (break_cpu_quantity, "does not match"),
    (break_cpu_type, "3.5 is not valid under any of the given schemas"),
    (break_duplicate_port, "duplicate entries in a list-type=map list"),
    (break_metadata, "'labelz' was unexpected"),
], ids=lambda v: getattr(v, "__name__", ""))
def test_crd_validation_rejects_a_broken_rayjob(release, breakage, expected, offline):
    job = rayjob_train()
    breakage(job)
    errors = manifest_errors(job, release)
    assert any(expected in e for e in errors), errors


def test_an_integer_quantity_is_valid_int_or_string(offline):
    job = rayjob_train()
    worker_container(job)["resources"]["limits"]["cpu"] = 32
    assert manifest_errors(job, "v1.5.1") == []


def test_a_kuberay_170_field_is_rejected_by_151s_schema(offline):
    # The manifests must stay within 1.5.1: 1.7.0's preRunningDeadlineSeconds would be dropped by a 1.5.1 server.
    job = rayjob_train()
    job["spec"]["preRunningDeadlineSeconds"] = 1800
    assert manifest_errors(job, "v1.7.0") == []
    assert any("'preRunningDeadlineSeconds' was unexpected" in e for e in manifest_errors(job, "v1.5.1"))


def test_a_field_with_cel_rules_is_reported_not_passed(offline):
    job = rayjob_train()
    job["spec"]["managedBy"] = "ray.io/kuberay-operator"
    assert any("CEL rules" in e for e in manifest_errors(job, "v1.7.0"))


def test_an_unserved_api_version_is_rejected():
    job = rayjob_train()
    job["apiVersion"] = "ray.io/v2"
    with pytest.raises(AssertionError, match="not served"):
        manifest_errors(job, "v1.7.0")


@pytest.mark.parametrize(("name", "breakage", "expected"), [
    ("storage.yaml", lambda d: d["spec"].update(accessMode=["ReadWriteMany"]), "'accessMode' was unexpected"),
    ("storage.yaml", lambda d: d["spec"]["resources"]["requests"].update(storage=["500Gi"]), "storage"),
    ("configmap.yaml", lambda d: d["data"].update({"run.toml": 3}), "3 is not of type 'string'"),
    ("configmap.yaml", lambda d: d.update(datas={}), "'datas' was unexpected"),
], ids=["pvc-unknown-field", "pvc-wrong-type", "configmap-wrong-type", "configmap-unknown-field"])
def test_kubernetes_validation_rejects_a_broken_object(name, breakage, expected, offline):
    (doc,) = docs(name)
    breakage(doc)
    errors = manifest_errors(doc, KUBERAY_RELEASES[0])
    assert errors and any(expected in e for e in errors), errors


# json_schema's handling of what KubeRay's CRDs do not use today (a newer release might)
def test_preserve_unknown_fields_keeps_extra_fields():
    node = {"type": "object", "properties": {"a": {"type": "string"}}}
    closed = json_schema(node)
    open_ = json_schema({**node, "x-kubernetes-preserve-unknown-fields": True})
    assert not StructuralValidator(closed).is_valid({"a": "x", "b": 1})
    assert StructuralValidator(open_).is_valid({"a": "x", "b": 1})


def test_embedded_resource_needs_apiversion_and_kind():
    embedded = {"type": "object", "x-kubernetes-embedded-resource": True, "x-kubernetes-preserve-unknown-fields": True}
    schema = json_schema({"type": "object", "properties": {"spec": embedded}})
    validator = StructuralValidator(schema)
    assert validator.is_valid({"spec": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}})
    assert not validator.is_valid({"spec": {"metadata": {"name": "p"}}})


def test_int_or_string_and_nullable():
    validator = StructuralValidator(json_schema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True}, "note": {"type": "string", "nullable": True}}}))
    assert validator.is_valid({"port": 8265, "note": None}) and validator.is_valid({"port": "dashboard"})
    assert not validator.is_valid({"port": [8265]}) and not validator.is_valid({"note": 3})


# -- the RayJobs: their own cluster, a deadline that stops the run -------------------------------------------
@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjobs_own_a_cluster_that_their_deadline_takes_down(name):
    (job,) = docs(name)
    spec = job["spec"]
    # KubeRay never deletes a cluster chosen by clusterSelector (rayjob_controller.go, the Complete/Failed
    # case): the RayJob must bring its own, a copy of raycluster.yaml's spec.
    assert "clusterSelector" not in spec
    assert spec["rayClusterSpec"] == cluster_spec("raycluster.yaml")
    # activeDeadlineSeconds only marks the RayJob Failed / DeadlineExceeded; shutdownAfterJobFinishes deletes
    # the cluster ttlSecondsAfterFinished later, which is what stops the run.
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and 0 <= spec["ttlSecondsAfterFinished"] <= 300
    # deletionStrategy needs the RayJobDeletionPolicy feature gate, off by default in 1.5.1: the RayJob would
    # fail validation there.
    assert "deletionStrategy" not in spec
    assert spec["backoffLimit"] == 0 and spec["submissionMode"] == "K8sJobMode"
    # KubeRay's own limits on a RayJob name (a DNS-1035 label; 6 characters left for the cluster's suffix).
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 47
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_rayjobs_run_carat_with_a_config_from_the_configmap(tmp_path):
    entrypoints = {name: docs(name)[0]["spec"]["entrypoint"] for name in RAYJOBS}
    assert entrypoints["rayjob-train.yaml"].startswith("python -m carat.train ")
    assert entrypoints["rayjob-tune.yaml"].startswith("python -m carat.tune ")
    # a fixed run name: re-creating the RayJob resumes the run from its last checkpoint
    assert re.search(r"--run-name \S+", entrypoints["rayjob-train.yaml"])
    keys = configmap_tomls()
    for entrypoint in entrypoints.values():
        config = re.search(r"--config (\S+)", entrypoint).group(1)
        assert config.startswith("/etc/carat/") and Path(config).name in keys
        assert "num_workers=8" not in entrypoint


def test_the_sweeps_deadline_covers_its_time_budget(tmp_path):
    (job,) = docs("rayjob-tune.yaml")
    assert job["spec"]["activeDeadlineSeconds"] > load_configmap_toml("sweep.toml", tmp_path).tune.time_budget_s


def test_readme_says_what_resubmitting_does():
    readme = (CLUSTER / "README.md").read_text()
    assert "kubectl delete -f cluster/k8s/rayjob-train.yaml && kubectl apply -f cluster/k8s/rayjob-train.yaml" in readme
    for name in RAYJOBS:
        resubmit = f"kubectl delete -f cluster/k8s/{name} && kubectl apply -f cluster/k8s/{name}"
        assert resubmit in (K8S / name).read_text()


# -- carat's invariants in every Ray pod ---------------------------------------------------------------------
def test_configmap_tomls_load_through_carats_config_loader(tmp_path):
    for key in configmap_tomls():
        cfg = load_configmap_toml(key, tmp_path)
        assert cfg.train.synth_if_missing is False, key
        assert cfg.train.shard_dir.startswith("/data/") and cfg.train.storage_path.startswith("/data/"), key
        assert cfg.train.num_workers == 0, f"{key}: workers follow the cluster's GPUs, not a hard-coded count"
    assert load_configmap_toml("sweep.toml", tmp_path).tune.sweep_name  # a fixed name: re-creating resumes the sweep


@pytest.mark.parametrize("name", CLUSTER_SPECS)
def test_every_cluster_shares_storage_config_and_a_memory_backed_shm(name):
    spec = cluster_spec(name)
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token"
    (pvc,) = docs("storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for pod in pod_specs(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        images.add(container["image"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert volumes[mounts["/etc/carat"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and quantity_bytes(shm["sizeLimit"]) > 64 * 2**20
        for var in container.get("env", []):
            assert var["name"] != "RAY_AUTH_TOKEN" or "valueFrom" in var, "a token in a manifest"
    assert len(images) == 1


@pytest.mark.parametrize("name", CLUSTER_SPECS)
def test_gpu_workers_shm_holds_object_store_and_every_ranks_loader_rings(name, tmp_path):
    loader = load_configmap_toml("run.toml", tmp_path).loader
    # the largest batch a ring slot holds: the token budget bounds batch x longest length of every modality
    largest_batch = loader.token_budget * sum(FEATURE_DIMS.values()) * 4  # float32: the worst case
    per_rank = loader.num_workers * (loader.prefetch_factor + 1) * largest_batch
    for group in cluster_spec(name)["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        object_store = float(group["rayStartParams"]["object-store-memory"])
        assert quantity_bytes(shm["sizeLimit"]) >= object_store + gpus * per_rank
        assert quantity_bytes(container["resources"]["limits"]["memory"]) > quantity_bytes(shm["sizeLimit"])


# -- Docker --------------------------------------------------------------------------------------------------
# The oldest Linux driver for each CUDA major version (NVIDIA's CUDA compatibility table; minor versions
# within a major run on it).
MIN_DRIVER = {"12": 525, "13": 580}


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", dockerfile(), re.M).group(1)


def dockerfile_instructions() -> list[str]:
    # Docker joins a line ending in a backslash with the next one.
    return dockerfile().replace("\\\n", "").splitlines()


def torch_install_command() -> list[str]:
    (run,) = [line for line in dockerfile_instructions() if line.startswith("RUN pip install") and " torch==" in line]
    return shlex.split(run.removeprefix("RUN "))


def base_image_cuda() -> str:
    """cuXYZ from the base image's tag (Ray tags a CUDA image -cuXYZ; -gpu is an alias that names none)."""
    image = dockerfile_arg("RAY_IMAGE")
    match = re.fullmatch(r"rayproject/ray:2\.60\.0-py311-(cu\d{3})", image)
    assert match, f"{image}: name the CUDA in the tag (rayproject/ray:2.60.0-py311-cuXYZ)"
    return match.group(1)


def torch_cuda_source() -> str:
    """cuXYZ of the PyTorch index torch is installed from."""
    command = torch_install_command()
    assert "torch==${TORCH_VERSION}" in command
    index = command[command.index("--index-url") + 1].replace("${TORCH_CUDA}", dockerfile_arg("TORCH_CUDA"))
    match = re.fullmatch(r"https://download\.pytorch\.org/whl/(cu\d{3})", index)
    assert match, f"torch from {index}: not a PyTorch CUDA index"
    return match.group(1)


def test_dockerfile_pairs_the_base_images_cuda_with_torchs():
    cuda = base_image_cuda()
    assert torch_cuda_source() == cuda, "two CUDA versions in one image"
    # the docs state the same CUDA and driver floor
    version = f"{cuda[2:-1]}.{cuda[-1]}"
    driver = f"driver >= {MIN_DRIVER[cuda[2:-1]]}"
    readme = (CLUSTER / "README.md").read_text()
    for text in (dockerfile(), readme):
        assert f"CUDA {version}" in text and driver in text
    assert dockerfile_arg("RAY_IMAGE") in readme


def test_dockerfile_uses_the_tested_ray_image_and_the_readme_install_steps():
    floor = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                 if d.startswith("ray["))
    assert floor.endswith(">=2.60") and ":2.60.0-" in dockerfile_arg("RAY_IMAGE")
    text = dockerfile()
    readme = (REPO / "README.md").read_text()
    assert f"pip install torch=={dockerfile_arg('TORCH_VERSION')}" in readme
    assert f"pip install --no-build-isolation deepspeed=={dockerfile_arg('DEEPSPEED_VERSION')}" in readme
    assert "--no-build-isolation deepspeed==${DEEPSPEED_VERSION}" in text
    installs = [line for line in text.splitlines() if "pip install" in line and "carat-src" in line]
    assert installs and not any(" -e " in line or "--editable" in line for line in installs)
    assert "docker build -f cluster/Dockerfile" in readme


def cuda_check_code() -> str:
    """The Dockerfile's build-time check that torch's CUDA is the image's nvcc (the `python -c` after torch)."""
    command = torch_install_command()
    return command[command.index("-c") + 1]


@pytest.mark.parametrize(("torch_cuda", "nvcc", "passes"), [
    ("13.0", "13.0", True),
    ("13.0", "12.1", False),   # the old pairing: Ray's CUDA 12.1 image under a CUDA 13.0 torch
    ("", "12.1", True),        # a CPU torch (the stand-in build)
    ("13.0", None, True),      # no nvcc in the image
])
def test_dockerfile_build_fails_when_torch_and_nvcc_differ(tmp_path, torch_cuda, nvcc, passes):
    if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("this machine has a real nvcc")
    fake_torch = tmp_path / "site" / "torch"
    fake_torch.mkdir(parents=True)
    (fake_torch / "__init__.py").write_text(
        f"from types import SimpleNamespace\nversion = SimpleNamespace(cuda={torch_cuda or None!r})\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvcc:
        (bin_dir / "nvcc").write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc}, V{nvcc}.48'\n")
        (bin_dir / "nvcc").chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-c", cuda_check_code()], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode == 0) == passes, proc.stdout + proc.stderr
    assert f"torch CUDA {torch_cuda or None} | image nvcc {nvcc}" in proc.stdout
    if not passes:
        assert "change RAY_IMAGE and TORCH_CUDA together" in proc.stderr


def _docker_with_standin_base() -> str | None:
    """Why the image build test cannot run here, or None when a Docker daemon and the stand-in base are there."""
    if shutil.which("docker") is None:
        return "no docker client"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker daemon reachable"
    probe = subprocess.run(["docker", "image", "inspect", "standin-base:latest"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return "no standin-base:latest image (build it: cluster/standin/Dockerfile's header)"
    return None


@pytest.mark.slow
def test_image_builds_on_the_standin_base_and_runs_one_epoch(tmp_path):
    """Opt-in: where Docker runs and the registry-free stand-in base is built, the real cluster/Dockerfile
    builds on it (CPU torch: TORCH_CUDA=cpu) and the image trains one quickstart epoch through the default
    Ray launcher."""
    reason = _docker_with_standin_base()
    if reason:
        pytest.skip(reason)
    tag = "carat:standin-test"
    build = subprocess.run(["docker", "build", "--network", "host", "-f", str(CLUSTER / "Dockerfile"),
                            "--build-arg", "RAY_IMAGE=standin-base:latest", "--build-arg", "TORCH_CUDA=cpu",
                            "-t", tag, str(REPO)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "carat ds_configs at" in build.stdout + build.stderr
    run = subprocess.run(["docker", "run", "--rm", "--network", "host", "--shm-size=2g", tag, "python", "-m",
                          "carat.train", "--train.epochs=1", "--train.storage_path=/tmp/runs"],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[carat] verdict:" in run.stdout + run.stderr
