"""cluster/ agrees with itself and with the code: one image, one Ray version, entrypoints that
exist, GPU counts that add up, dashboards that stay private, token authentication everywhere.
Parses files; starts no Ray (tests/test_cluster_auth.py does). The bare-machine scripts:
tests/test_cluster_scripts.py."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from matsci_ray.config import ExperimentConfig, load_config, load_study

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
MANIFESTS = [RAYCLUSTER, RAYJOB]
SHARED = "/data/matsci-ray"  # the shared volume every node mounts (cluster/README.md)
GCS_PORT, METRICS_PORT = "6379", "8080"
LOOPBACK = {"127.0.0.1", "localhost"}
GPU = "nvidia.com/gpu"


# --- reading the files -----------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _doc(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [d for d in _docs(path) if d.get("kind") == kind]
    return found


def _cluster_spec(path: Path) -> dict[str, Any]:
    """The RayCluster spec of a manifest: its own, or the one a RayJob creates."""
    if path == RAYJOB:
        return _doc(path, "RayJob")["spec"]["rayClusterSpec"]
    return _doc(path, "RayCluster")["spec"]


def _pods(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, rayStartParams, pod template) for the head and each worker group."""
    head = spec["headGroupSpec"]
    groups = [("head", head.get("rayStartParams", {}), head["template"])]
    for group in spec.get("workerGroupSpecs", []):
        groups.append((group["groupName"], group.get("rayStartParams", {}), group["template"]))
    return groups


def _ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay's Ray container is the first


def _limits(container: dict[str, Any]) -> dict[str, Any]:
    return container.get("resources", {}).get("limits", {})


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _instr(name: str) -> list[str]:
    return [args for word, args in _dockerfile() if word == name]


def _image() -> str:
    """The tag the Dockerfile's header says to build."""
    match = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert match, "cluster/Dockerfile: header must give the build command with its tag"
    return match.group(1)


def _base_ray_version() -> str:
    (base,) = _instr("FROM")
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert match, f"cluster/Dockerfile: unexpected base image {base!r}"
    return match.group(1)


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def _project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', _pyproject(), re.M)
    assert match
    return match.group(1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _flags(command: str) -> dict[str, str]:
    """`--name=value` / `--name value` flags of a shell command line."""
    tokens = shlex.split(command.replace(";", " ; "))
    flags: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            if not eq:
                nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
                value = nxt if nxt and not nxt.startswith("-") and nxt != ";" else "true"
            flags[name] = value
    return flags


def _launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def _launcher_ray_start(key: str) -> dict[str, str]:
    (start,) = [c for c in _launcher()[key] if "ray start" in c]
    return _flags(start)


def _experiment(script: str, config: str) -> ExperimentConfig:
    """The experiment a job runs: single_task takes an experiment, the others a study."""
    if Path(script).name == "single_task.py":
        return load_config(ROOT / config)
    return load_study(ROOT / config).base


def _job_commands() -> list[tuple[Path, str, str]]:
    """(file, script, config) of every `python jobs/X.py configs/Y.yaml` in cluster/."""
    found = []
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and path.suffix in {".md", ".yaml", ".sh", ""}:
            text = re.sub(r"\\\n\s*", " ", path.read_text())
            for m in re.finditer(r"python3? (jobs/\S+\.py) (configs/\S+\.yaml)", text):
                found.append((path, m.group(1), m.group(2)))
    return found


# --- one image, one Ray ----------------------------------------------------------------------


def test_one_image_tag_everywhere() -> None:
    image = _image()
    version = _project_version()
    assert image.endswith(f":{version}"), f"image tag {image} is not project.version {version}"
    assert f'org.opencontainers.image.version="{version}"' in DOCKERFILE.read_text()

    docker = _launcher()["docker"]
    assert docker["image"] == image, "aws-gpu.yaml docker.image"
    assert docker.get("head_image", image) == docker.get("worker_image", image) == image
    for path in MANIFESTS:
        for group, _, template in _pods(_cluster_spec(path)):
            for container in template["spec"]["containers"]:
                assert container["image"] == image, f"{path.name}: {group}/{container['name']}"
    submitter = _doc(RAYJOB, "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert [c["image"] for c in submitter] == [image]
    assert image in (CLUSTER / "README.md").read_text()


def test_ray_and_torch_versions_agree() -> None:
    import ray

    base = _base_ray_version()
    assert base.split(".")[:2] == ray.__version__.split(".")[:2], (
        f"image Ray {base} vs installed Ray {ray.__version__}"
    )
    lower = re.search(r'"ray\[[^\]]*\]>=([\d.]+)"', _pyproject())
    assert lower and _version(base) >= _version(lower.group(1)), "below pyproject's ray bound"
    run = " ".join(_instr("RUN"))
    assert re.search(rf'"ray\[[^\]]*\]=={re.escape(base)}"', run), "pip must pin the base's Ray"
    for path in MANIFESTS:
        assert _cluster_spec(path)["rayVersion"] == base, path.name

    torch_pin = re.search(r"torch==([\d.]+)", run)
    ci_pin = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())
    assert torch_pin and ci_pin and torch_pin.group(1) == ci_pin.group(1)


def test_image_holds_the_entrypoints_and_keeps_workers_alive() -> None:
    copied = {src for args in _instr("COPY") for src in args.split()[:-1] if "--" not in src}
    assert {"pyproject.toml", "matsci_ray", "jobs", "configs"} <= copied
    (workdir,) = _instr("WORKDIR")
    runtime_env = yaml.safe_load(_doc(RAYJOB, "RayJob")["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == workdir, "the RayJob ships the image's repository"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(_instr("ENV"))))
    assert int(env["RAY_num_workers_soft_limit"]) >= 16


# --- entrypoints and GPU counts ----------------------------------------------------------------


def _gpu_capacity_kuberay(spec: dict[str, Any]) -> tuple[int, float]:
    """(GPUs of all worker groups, CPUs of the smallest GPU worker)."""
    gpus, cpus = 0, float("inf")
    for group in spec.get("workerGroupSpecs", []):
        n = int(group.get("rayStartParams", {}).get("num-gpus", 0))
        if n:
            gpus += n * int(group["replicas"])
            params = group.get("rayStartParams", {})
            node_cpus = params.get("num-cpus", _limits(_ray_container(group["template"]))["cpu"])
            cpus = min(cpus, float(node_cpus))
    return gpus, cpus


def _gpu_capacity_launcher() -> tuple[int, float]:
    gpus, cpus = 0, float("inf")
    for node_type in _launcher()["available_node_types"].values():
        n = node_type.get("resources", {}).get("GPU", 0)
        if n:
            gpus += n * node_type.get("max_workers", 0)
            cpus = min(cpus, node_type["resources"]["CPU"])
    return gpus, cpus


def _check_fits(config: ExperimentConfig, gpus: int, cpus: float, where: str) -> None:
    assert config.run.use_gpu, f"{where}: runs on GPU nodes, so run.use_gpu must be true"
    assert config.run.num_workers <= gpus, f"{where}: {config.run.num_workers} workers > {gpus}"
    assert config.run.cpus_per_worker <= cpus, f"{where}: a worker does not fit one GPU node"


def test_rayjob_entrypoint_exists_and_fits_its_cluster() -> None:
    entrypoint = shlex.split(_doc(RAYJOB, "RayJob")["spec"]["entrypoint"])
    assert len(entrypoint) == 3 and entrypoint[0] in {"python", "python3"}, entrypoint
    _, script, config = entrypoint
    assert script.startswith("jobs/") and (ROOT / script).is_file(), f"no {script}"
    assert (ROOT / config).is_file(), f"no {config}"
    experiment = _experiment(script, config)
    _check_fits(experiment, *_gpu_capacity_kuberay(_cluster_spec(RAYJOB)), "rayjob.yaml")
    _check_fits(experiment, *_gpu_capacity_kuberay(_cluster_spec(RAYCLUSTER)), "raycluster.yaml")


def test_documented_jobs_exist_and_fit_the_gpu_clusters() -> None:
    commands = _job_commands()
    assert commands, "cluster/ documents no job command"
    for path, script, config in commands:
        where = f"{path.relative_to(ROOT)}: {script} {config}"
        assert (ROOT / script).is_file(), f"{where}: no such job"
        assert (ROOT / config).is_file(), f"{where}: no such config"
        _check_fits(_experiment(script, config), *_gpu_capacity_launcher(), where)
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            for script in re.findall(r"\bjobs/[\w<>]+\.py", path.read_text()):
                assert "<" in script or (ROOT / script).is_file(), f"{path.name}: {script}"


def test_cluster_configs_keep_data_on_the_shared_volume() -> None:
    for _, _, config in _job_commands():
        raw = yaml.safe_load((ROOT / config).read_text())
        raw = raw.get("base", raw)
        for key, value in [
            ("data.root", raw["data"]["root"]),
            ("run.storage", raw["run"]["storage"]),
        ]:
            assert str(value).startswith(SHARED + "/"), f"{config}: {key} off the shared volume"
    assert any(o.endswith(f":{SHARED}") for o in _launcher()["docker"]["run_options"])
    for path in MANIFESTS:
        for group, _, template in _pods(_cluster_spec(path)):
            mounts = [m["mountPath"] for m in _ray_container(template).get("volumeMounts", [])]
            assert SHARED in mounts, f"{path.name}: {group} does not mount {SHARED}"


def test_gpu_limits_equal_num_gpus() -> None:
    for path in MANIFESTS:
        spec = _cluster_spec(path)
        for group, params, template in _pods(spec):
            resources = _ray_container(template).get("resources", {})
            limit = int(resources.get("limits", {}).get(GPU, 0))
            assert limit == int(params.get("num-gpus", 0)), f"{path.name}: {group}"
            if GPU in resources.get("requests", {}):
                assert int(resources["requests"][GPU]) == limit, f"{path.name}: {group}"
            if group == "head":
                assert limit == 0, f"{path.name}: the head is CPU-only"
        assert _gpu_capacity_kuberay(spec)[0] > 0, f"{path.name}: no GPU worker group"
    launcher = _launcher()
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0, "aws-gpu.yaml: the head is CPU-only"
    assert _gpu_capacity_launcher()[0] > 0


# --- ports and security ----------------------------------------------------------------------


def test_launcher_matches_rays_schema_and_ports() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_launcher(), schema)
    head = _launcher_ray_start("head_start_ray_commands")
    worker = _launcher_ray_start("worker_start_ray_commands")
    assert head["port"] == GCS_PORT and worker["address"].endswith(f":{GCS_PORT}")
    assert head["metrics-export-port"] == worker["metrics-export-port"] == METRICS_PORT
    for path in MANIFESTS:
        for group, params, _ in _pods(_cluster_spec(path)):
            assert params.get("metrics-export-port") == METRICS_PORT, f"{path.name}: {group}"


def _guarded_by_network_policy(path: Path, labels: dict[str, str]) -> bool:
    """A NetworkPolicy in ``path`` selects these pods and admits only the same pods, or the
    job API port from the KubeRay operator."""
    for policy in (d for d in _docs(path) if d.get("kind") == "NetworkPolicy"):
        spec = policy["spec"]
        selector = spec["podSelector"].get("matchLabels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            continue
        assert "Ingress" in spec.get("policyTypes", [])
        for rule in spec.get("ingress", []):
            peers = rule.get("from", [])
            same = all(p.get("podSelector", {}).get("matchLabels") == selector for p in peers)
            operator = all(
                p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                == "kuberay-operator"
                for p in peers
            ) and [p.get("port") for p in rule.get("ports", [])] == [8265]
            assert peers and (same or operator), f"{path.name}: ingress rule too open: {rule}"
        return True
    return False


def test_dashboards_stay_private() -> None:
    head = _launcher_ray_start("head_start_ray_commands")
    assert head.get("dashboard-host") in LOOPBACK, "aws-gpu.yaml: set --dashboard-host=127.0.0.1"
    assert "dashboard-host" not in _launcher_ray_start("worker_start_ray_commands")

    # KubeRay binds 0.0.0.0 unless told otherwise, so the manifests must say.
    for path in MANIFESTS:
        spec = _cluster_spec(path)
        host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host")
        labels = spec["headGroupSpec"]["template"]["metadata"]["labels"]
        for _, _, template in _pods(spec):
            assert _guarded_by_network_policy(path, template["metadata"]["labels"]), path.name
        if path == RAYJOB:
            # the operator and the submitter reach the job API through the head Service
            assert host in LOOPBACK | {"0.0.0.0"}, f"{path.name}: {host}"
            assert _guarded_by_network_policy(path, labels)
        else:
            assert host in LOOPBACK, f"{path.name}: dashboard-host {host!r}"

    # nowhere else: no file binds a dashboard to every interface
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix != ".md" and path != RAYJOB:
            assert not re.search(r"dashboard[-_]host\W+0\.0\.0\.0", path.read_text(), re.I), path


def test_dashboard_service_is_not_public() -> None:
    for path in MANIFESTS:
        spec = _cluster_spec(path)
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", path.name
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress", False), path.name
        for doc in _docs(path):
            assert doc["kind"] != "Ingress", f"{path.name}: an Ingress exposes the job API"
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name


# --- token authentication ----------------------------------------------------------------------

AUTH_SECRET_KEY = "auth_token"  # the key KubeRay's authOptions.secretName requires


def test_launcher_ships_the_token_and_demands_it() -> None:
    launcher = _launcher()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in launcher[key] if "ray start" in c]
        assert re.search(r"(^|[;&]\s*)RAY_AUTH_MODE=token ray start ", start), f"{key}: {start}"
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    # Ray's default token path inside every container, from a local file the README makes
    source = launcher["file_mounts"]["~/.ray/auth_token"]
    readme = (CLUSTER / "README.md").read_text()
    assert f"cluster/new-token.sh {source}" in readme, "README: how to make the shipped token"
    assert f"RAY_AUTH_TOKEN_PATH={source}" in readme, "README: how clients use it"


def _containers(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, container) for every container of a manifest's Ray pods and its submitter."""
    found = [
        (f"{group}/{c['name']}", c)
        for group, _, template in _pods(_cluster_spec(path))
        for c in template["spec"]["containers"]
    ]
    if path == RAYJOB:
        submitter = _doc(RAYJOB, "RayJob")["spec"]["submitterPodTemplate"]["spec"]
        found += [(f"submitter/{c['name']}", c) for c in submitter["containers"]]
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_pods_take_the_token_from_one_secret(path: Path) -> None:
    auth = _cluster_spec(path)["authOptions"]
    assert auth["mode"] == "token", f"{path.name}: authOptions.mode"
    secret = auth["secretName"]
    for where, container in _containers(path):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{path.name}: {where}"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret, "key": AUTH_SECRET_KEY}, f"{path.name}: {where}"
    assert f"kubectl create secret generic {secret}" in path.read_text(), "header: make it"
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {secret}" in readme
    assert f"--from-file={AUTH_SECRET_KEY}=" in readme
