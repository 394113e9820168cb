"""Fast tier: every cluster declaration validated offline, with the validators that matter.

* Launcher YAMLs: Ray's own `prepare_config` + `validate_config` (the JSON schema shipped in
  the ray package and the checks `ray up` runs before it calls the cloud).
* KubeRay manifests: the ray.io/v1 fields (tests/cluster/kuberay_v1.schema.json, from KubeRay's
  Go API types; unknown fields fail), every pod template against the Kubernetes core schema
  (kubernetes-validate, offline), the runtime env through Ray's parser, and the entrypoint
  through capsnet's own CLI and config loader.
* The SLURM script: `bash -n` and its DRY_RUN command, whose entrypoint capsnet's CLI parses.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"]
SCHEMA = json.loads((Path(__file__).parent / "kuberay_v1.schema.json").read_text())
RUNTIME_ENV_KEYS = {
    "working_dir",
    "py_modules",
    "pip",
    "uv",
    "conda",
    "env_vars",
    "excludes",
    "image_uri",
    "config",
    "py_executable",
}


def load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def ray_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- cluster launcher -------------------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_yaml_passes_ray_validation(path):
    config = load(path)
    prepared = ray_validate(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) == 8}
    assert len(gpu_types) == 2, "an on-demand and a spot/preemptible 8-GPU type"
    assert any("spot" in name for name in gpu_types)
    for t in gpu_types.values():
        assert t["max_workers"] >= t["min_workers"] >= 0
    # token: from a file mount of the user's own token file, never a literal
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in start, "the Jobs API is reached through a tunnel"
    assert {".venv", ".git", "runs", "shards", "data"} <= set(config["rsync_exclude"])
    assert any("pip install" in c and "~/capsnet" in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_validation_catches_typos(path):
    config = load(path)
    node = next(t for t in config["available_node_types"].values() if "min_workers" in t)
    node["min_worker"] = node.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(config)


# --- KubeRay ----------------------------------------------------------------------------------


def pod_templates(doc: dict) -> dict[str, dict]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    out = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]
    if "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]
    return out


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_manifest_matches_kuberay_schema(path):
    doc = load(path)
    jsonschema.validate(doc, SCHEMA)
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_pod_templates_match_kubernetes_schema(path):
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="pip install kubernetes-validate (dev extra) for the "
        "offline Kubernetes core schemas",
    )
    for name, template in pod_templates(load(path)).items():
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": template,
        }
        kv.validate(wrapped, kv.latest_version(), strict=True)


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_token_comes_from_a_secret(path):
    templates = pod_templates(load(path))
    for name, template in templates.items():
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", name
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token, f"{name}: a literal token"
            assert token["valueFrom"]["secretKeyRef"]["name"] == "capsnet-ray-token"
    gpu = [t for n, t in templates.items() if n not in ("head", "submitter")]
    assert gpu and all(
        t["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8" for t in gpu
    )


def test_kuberay_schema_catches_typos():
    doc = load("cluster/kuberay/rayjob.yaml")
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)
    doc = load("cluster/kuberay/raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)


def check_capsnet_entrypoint(argv: list[str]) -> None:
    """`python -m pipeline.cli train ...`: a real capsnet command whose config loads."""
    assert argv[:3] == ["python", "-m", "pipeline.cli"], argv
    assert (REPO / "pipeline" / "cli.py").is_file()
    args = build_parser().parse_args(argv[3:])
    assert args.cli_command in ("train", "tune")
    if args.cli_command == "train":
        assert (REPO / args.config).is_file(), args.config
        load_config(REPO / args.config, args.overrides)


def test_rayjob_runs_capsnet_train_and_cleans_up():
    spec = load("cluster/kuberay/rayjob.yaml")["spec"]
    check_capsnet_entrypoint(shlex.split(spec["entrypoint"]))
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0 and spec["activeDeadlineSeconds"] > 0
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RUNTIME_ENV_KEYS
    RuntimeEnv(**runtime_env)  # Ray's own parser/validator
    assert any(p.startswith("webdataset") for p in runtime_env["pip"])


# --- SLURM ------------------------------------------------------------------------------------


SBATCH = "cluster/slurm/capsnet.sbatch"


def test_sbatch_script_parses_and_runs_capsnet():
    subprocess.run(["bash", "-n", SBATCH], cwd=REPO, check=True)
    text = (REPO / SBATCH).read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M)
    env = {
        "PATH": "/usr/bin:/bin",
        "DRY_RUN": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "64",
        "HEAD_IP": "10.0.0.1",
        "EXTRA_ARGS": "--set train.epochs=1",
    }
    out = subprocess.run(
        ["bash", SBATCH], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    argv = shlex.split(out)
    assert argv[:2] == ["srun", "--nodes=2"]
    sym = argv.index("symmetric-run")
    assert argv[sym - 1] == "ray" and argv[argv.index("--min-nodes") + 1] == "2"
    assert argv[argv.index("--num-gpus") + 1] == "8"
    entry = argv[argv.index("--") + 1 :]
    assert entry[:2] == ["env", "RAY_ADDRESS=10.0.0.1:6379"]
    check_capsnet_entrypoint(entry[2:])


# --- run configs and secrets --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs" / "cluster").glob("*.yaml")),
)
def test_cluster_run_configs_load_and_say_how_to_run(path):
    text = (REPO / path).read_text()
    assert "Command" in text and "runtime" in text
    if "\nsearch:" in text:  # a Tune search config: a run config + a search section
        from pipeline.tune import load_tune_config

        tc = load_tune_config(REPO / path)
        cfg, paths = tc.base, [tc.search.storage_path]
    else:
        cfg, paths = load_config(REPO / path), []
    for value in (cfg.data.shards, cfg.run.storage_path, *paths):  # what pipeline.submit insists on
        assert "://" in value or value.startswith("/"), value


def test_mnist_16gpu_is_two_8gpu_nodes_in_bf16():
    cfg = load_config(REPO / "configs/cluster/mnist-16gpu.yaml")
    assert (cfg.run.num_workers, cfg.run.use_gpu, cfg.train.precision) == (16, True, "bf16")
    assert cfg.data.shards.startswith("s3://") and cfg.run.storage_path.startswith("s3://")


SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)(secret|token|password)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{24,}",
    r"\b[0-9a-f]{32,}\b",
]


def test_no_credentials_in_cluster_files():
    files = [p for p in (REPO / "cluster").rglob("*") if p.is_file()]
    files += list((REPO / "configs" / "cluster").glob("*.yaml"))
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text), f"{path}: looks like a credential ({pattern})"
