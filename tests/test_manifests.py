"""manifests/: kustomize renders each overlay; kubernetes-validate --strict accepts every built-in
resource at the Kubernetes version Kubeflow 1.10 targets; the PyTorchJob satisfies the vendored Training
Operator v1.9 CRD schema (strictly) and converts into the training SDK's models; every pod template
passes Pod Security "restricted"; the profile namespace is never created or relabelled and RoleBinding
subjects follow a changed namespace; RBAC is least privilege; names, paths, images and commands agree
with the config, the pipeline and the CLI."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes.client.models as k8s_models
import kubernetes_validate
import pytest
import yaml
from _kube_contracts import pytorchjob_errors, restricted_violations

from marble.cli import build_parser
from marble.cluster.secrets import DVC_KEYS, HF_TOKEN_KEY, MLFLOW_TOKEN_KEY
from marble.configio import load_config
from pipelines import images

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
OVERLAYS = ("local", "gpu-cluster")
K8S_VERSION = "1.32"
"""Kubeflow 1.10 targets Kubernetes 1.32 (kubeflow/manifests v1.10.x README; its kind node is v1.32.0)."""
NAMESPACE = "kubeflow-user-example-com"
KUBE_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
CFG = load_config(REPO / "configs" / "sd35m-marble.yaml").pipeline


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


needs_kustomize = pytest.mark.skipif(
    kustomize_command() is None, reason="neither `kubectl kustomize` nor `kustomize` is installed"
)


@cache
def rendered(overlay: str) -> str:
    out = subprocess.run(
        [*kustomize_command(), str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def docs(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered(overlay)) if d]


def by_kind(overlay: str, kind: str) -> list[dict]:
    return [d for d in docs(overlay) if d["kind"] == kind]


# ---------------------------------------------------------------- strict conversion through SDK models
QUANTITY_PARENTS = ("limits", "requests")


def to_model(data, type_name: str, path: str):
    """Build the SDK model `type_name` from `data`, refusing unknown fields and wrong scalar types.

    The SDK's own deserializer silently drops unknown keys, so the walk is done here with the models'
    `openapi_types` / `attribute_map`; the models' constructors still check required fields.
    """
    from kubeflow.training import models as kf_models

    if type_name.startswith("list["):
        assert isinstance(data, list), f"{path}: expected a list"
        return [to_model(v, type_name[5:-1], f"{path}[{i}]") for i, v in enumerate(data)]
    if type_name.startswith("dict("):
        assert isinstance(data, dict), f"{path}: expected a mapping"
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        if path.rsplit(".", 1)[-1] in QUANTITY_PARENTS:
            # Resource quantities are IntOrString in Kubernetes; the Python client types them as str.
            inner = "quantity"
        return {k: to_model(v, inner, f"{path}.{k}") for k, v in data.items()}
    if type_name == "quantity":
        assert isinstance(data, str | int) and not isinstance(data, bool), f"{path}: not a quantity: {data!r}"
        return str(data)
    if type_name == "str":
        assert isinstance(data, str), f"{path}: expected a string, got {data!r}"
        return data
    if type_name == "int":
        assert isinstance(data, int) and not isinstance(data, bool), (
            f"{path}: expected an integer, got {data!r}"
        )
        return data
    if type_name == "bool":
        assert isinstance(data, bool), f"{path}: expected a boolean, got {data!r}"
        return data
    if type_name in ("object", "float", "datetime"):
        return data
    cls = getattr(kf_models, type_name, None) or getattr(k8s_models, type_name)
    assert isinstance(data, dict), f"{path}: expected a {type_name} mapping"
    fields = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(fields))
    assert not unknown, f"{path}: unknown field(s) {unknown} for {type_name}"
    return cls(
        **{fields[k]: to_model(v, cls.openapi_types[fields[k]], f"{path}.{k}") for k, v in data.items()}
    )


# ----------------------------------------------------------------------------------------------- tests
@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay, tmp_path):
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(rendered(overlay))
    result = subprocess.run(
        [str(KUBE_VALIDATE), "--strict", "-k", K8S_VERSION, str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    builtin = [d for d in docs(overlay) if d["kind"] != "PyTorchJob"]
    # No Namespace: the profile's namespace belongs to the profile controller.
    assert {d["kind"] for d in builtin} == {"PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding"}
    for d in builtin:
        assert (
            f"passed for resource {d['kind'].lower()}/{d['metadata']['name']}"
            in result.stdout + result.stderr
        )


def test_strict_validation_catches_an_unknown_field():
    pvc = yaml.safe_load((MANIFESTS / "base" / "pvc.yaml").read_text())
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    pvc["spec"]["storageClass"] = "fast"  # the real field is storageClassName
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pytorchjob_converts_into_the_training_sdk_models(overlay):
    (job,) = by_kind(overlay, "PyTorchJob")
    model = to_model(job, "KubeflowOrgV1PyTorchJob", "PyTorchJob")
    replicas = model.spec.pytorch_replica_specs
    assert replicas["Master"].replicas == 1
    assert model.spec.run_policy.suspend is True, "applying the manifests must not start a training job"
    assert model.spec.nproc_per_node is not None
    for name, spec in replicas.items():
        (container,) = spec.template.spec.containers
        assert container.name == "pytorch", (
            "the training operator injects its env into the `pytorch` container"
        )
        # Each pod template is also a valid built-in PodTemplate, strictly.
        template = job["spec"]["pytorchReplicaSpecs"][name]["template"]
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": template,
        }
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    if overlay == "gpu-cluster":
        assert replicas["Worker"].replicas == 2 and model.spec.nproc_per_node == "8"
        for spec in replicas.values():
            assert spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "8"
            assert spec.template.spec.tolerations[0].key == "nvidia.com/gpu"
    else:
        assert set(replicas) == {"Master"}
        assert "nvidia.com/gpu" not in replicas["Master"].template.spec.containers[0].resources.limits


def test_the_sdk_conversion_refuses_an_unknown_field():
    job = yaml.safe_load((MANIFESTS / "base" / "pytorchjob.yaml").read_text())
    to_model(job, "KubeflowOrgV1PyTorchJob", "PyTorchJob")
    job["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicyy"] = "Never"
    with pytest.raises(AssertionError, match="restartPolicyy"):
        to_model(job, "KubeflowOrgV1PyTorchJob", "PyTorchJob")


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_pipelines_pinned_images(overlay):
    (job,) = by_kind(overlay, "PyTorchJob")
    refs = {
        c["image"]
        for spec in job["spec"]["pytorchReplicaSpecs"].values()
        for c in spec["template"]["spec"]["containers"] + spec["template"]["spec"].get("initContainers", [])
    }
    expected = images.CPU_IMAGE if overlay == "local" else images.CUDA_IMAGE
    assert refs == {expected}


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_names_and_paths_agree_with_the_pipeline_config(overlay):
    (pvc,) = by_kind(overlay, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == CFG.cache_pvc
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs(overlay))
    (job,) = by_kind(overlay, "PyTorchJob")
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        assert pod["serviceAccountName"] == CFG.job_service_account
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == CFG.cache_pvc
        for c in pod["containers"] + pod.get("initContainers", []):
            assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] == volume["name"]} == {
                CFG.cache_mount
            }


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pytorchjob_satisfies_the_training_operator_crd(overlay):
    (job,) = by_kind(overlay, "PyTorchJob")
    assert pytorchjob_errors(job) == []


def test_the_crd_check_is_strict():
    job = yaml.safe_load((MANIFESTS / "base" / "pytorchjob.yaml").read_text())
    assert pytorchjob_errors(job) == []
    bad = yaml.safe_load((MANIFESTS / "base" / "pytorchjob.yaml").read_text())
    bad["spec"]["runPolicy"]["suspended"] = True  # the real field is `suspend`
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    errors = " ".join(pytorchjob_errors(bad))
    assert "suspended" in errors and "'one' is not of type 'integer'" in errors


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_template_passes_pod_security_restricted(overlay):
    (job,) = by_kind(overlay, "PyTorchJob")
    for name, spec in job["spec"]["pytorchReplicaSpecs"].items():
        assert restricted_violations(spec["template"]["spec"]) == [], name
        assert spec["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_the_pod_security_check_can_fail():
    pod = {"containers": [{"name": "c"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    problems = " ".join(restricted_violations(pod))
    for rule in ("hostPath", "allowPrivilegeEscalation", "drop ALL", "runAsNonRoot", "seccompProfile"):
        assert rule in problems, rule


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_changed_namespace_moves_every_object_and_rolebinding_subject(overlay, tmp_path):
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    ns_file = copy / "overlays" / overlay / "namespace.yaml"
    ns_file.write_text(ns_file.read_text().replace(f"namespace: {NAMESPACE}", "namespace: team-vision"))
    out = subprocess.run(
        [*kustomize_command(), str(copy / "overlays" / overlay)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    rendered_docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["metadata"]["namespace"] for d in rendered_docs} == {"team-vision"}
    (binding,) = [d for d in rendered_docs if d["kind"] == "RoleBinding"]
    assert {s["namespace"] for s in binding["subjects"]} == {"team-vision"}


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_least_privilege(overlay):
    (role,) = by_kind(overlay, "Role")
    granted = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert not any(r == "secrets" or "*" in v or r == "*" for (_, r), v in granted.items())
    assert granted[("kubeflow.org", "pytorchjobs/status")] == {"get"}
    assert granted[("kubeflow.org", "pytorchjobs")] == {"get", "list", "watch", "create", "delete"}
    assert all(v <= {"get", "list", "watch"} for (g, r), v in granted.items() if g == "")
    (binding,) = by_kind(overlay, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == ["default-editor"]  # KFP's runner in a profile


@needs_kustomize
def test_pvc_access_modes_match_the_configs_that_use_them():
    tiny = load_config(REPO / "configs" / "tiny.yaml").pipeline
    (local_pvc,) = by_kind("local", "PersistentVolumeClaim")
    assert local_pvc["spec"]["accessModes"] == [tiny.cache_access_mode] == ["ReadWriteOnce"]
    (gpu_pvc,) = by_kind("gpu-cluster", "PersistentVolumeClaim")
    assert gpu_pvc["spec"]["accessModes"] == ["ReadWriteMany"] and gpu_pvc["spec"]["storageClassName"]
    # The gpu-cluster job's layout is one the paper config accepts (with the RWX volume it needs).
    (job,) = by_kind("gpu-cluster", "PyTorchJob")
    nodes = 1 + job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
    load_config(
        REPO / "configs" / "sd35m-marble.yaml",
        [
            f"pipeline.nodes={nodes}",
            f"pipeline.gpus={job['spec']['nprocPerNode']}",
            "pipeline.cache_access_mode=ReadWriteMany",
        ],
    )


def _expand(text: str, env: list[dict]) -> str:
    for var in env:
        if "value" in var:
            text = text.replace(f'"${var["name"]}"', var["value"]).replace(f"${var['name']}", var["value"])
    return text


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pytorchjob_commands_are_real_marble_commands(overlay):
    """Every `marble ...` call in the job parses with the real CLI parser and names a shipped config."""
    (job,) = by_kind(overlay, "PyTorchJob")
    parser = build_parser()
    seen = set()
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            script = _expand(" ".join(c.get("args", [])), c.get("env", []))
            for part in script.split(";"):
                words = shlex.split(part)
                if "marble" in words:
                    argv = words[words.index("marble") + 1 :]
                elif "marble.cli" in words:
                    argv = words[words.index("marble.cli") + 1 :]
                else:
                    continue
                args = parser.parse_args(argv)
                seen.add(args.command)
                config = Path(args.config)
                assert config.parts[:2] == ("/", "app"), "configs are read from the image's WORKDIR"
                load_config(REPO / config.relative_to("/app"), args.overrides)
    assert seen == {"prepare", "cache-rewards", "train"}


def test_secret_templates_hold_no_values_and_match_the_pipeline():
    expected = {
        "marble-hf-token": {HF_TOKEN_KEY},
        "marble-dvc-remote": set(DVC_KEYS),
        "marble-registry-token": {MLFLOW_TOKEN_KEY, "MODEL_REGISTRY_TOKEN"},
    }
    templates = sorted((MANIFESTS / "secrets").glob("*.template.yaml"))
    found = {}
    for path in templates:
        secret = yaml.safe_load(path.read_text())
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
        assert "data" not in secret, f"{path.name}: templates use empty stringData only"
        assert all(v == "" for v in secret["stringData"].values()), f"{path.name} holds a value"
        assert "namespace" not in secret["metadata"], f"{path.name}: created in the profile's namespace"
        found[secret["metadata"]["name"]] = set(secret["stringData"])
    assert found == expected
    # Templates are never part of what kustomize applies.
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):
        assert "secrets" not in kustomization.read_text().split("resources:")[-1].split("components:")[0]


def test_the_data_loader_pod_is_valid_and_restricted():
    pod = yaml.safe_load((MANIFESTS / "tools" / "data-loader.pod.yaml").read_text())
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert restricted_violations(pod["spec"]) == []
    (volume,) = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == CFG.cache_pvc
