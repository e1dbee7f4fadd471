"""cluster.yaml (the Ray cluster launcher config for AWS GPU clusters) is valid for Ray's own launcher.

The launcher (`ray up`) calls `prepare_config` (merge with the provider's defaults.yaml) and then
`validate_config` (ray/autoscaler/ray-schema.json plus a few cross-field checks) before it contacts the
cloud; these tests run exactly those two functions of the installed Ray, so no network or cloud call is
made. They also check the parts this project relies on (GPU workers, the [gpu] install, the start
commands, token auth, the commented on-prem block).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# EC2 instance families with NVIDIA GPUs (g4dn, g5, g6, g6e, gr6, p3, p4d, p4de, p5, p5e, p5en, p6...).
GPU_FAMILY = re.compile(r"^(g4dn|g5|g6e?|gr6|p3dn|p3|p4de?|p5e?n?|p6[\w-]*)\.")
ONPREM_BEGIN = "# --- on-premise (provider: local)"
ONPREM_END = "# --- end on-premise"


def _text() -> str:
    return CLUSTER_YAML.read_text()


def _config() -> dict:
    config = yaml.safe_load(_text())
    assert isinstance(config, dict)
    return config


def _prepared() -> dict:
    """What `ray up` validates: the config merged with Ray's AWS defaults."""
    return prepare_config(_config())


def _all_setup_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    return [cmd for key in keys for cmd in config.get(key) or []]


def _onprem_block() -> dict:
    """The commented on-premise block, uncommented and parsed."""
    text = _text()
    assert ONPREM_BEGIN in text and ONPREM_END in text, "the commented on-prem block is missing"
    block = text[text.index(ONPREM_BEGIN):text.index(ONPREM_END)].splitlines()
    # Prose first, then YAML commented out with "# " (and its own comments with "## ").
    start = next((i for i, line in enumerate(block) if line.startswith("# provider:")), None)
    assert start is not None, "the on-prem block has no commented `provider:` mapping"
    yaml_lines = [line[1:] if line.startswith("##") else line[2:] for line in block[start:]]
    parsed = yaml.safe_load("\n".join(yaml_lines))
    assert isinstance(parsed, dict), f"the on-prem block does not parse to a mapping: {parsed!r}"
    return parsed


def test_schema_validates_the_file_as_written():
    """The file itself (before defaults are merged in) satisfies Ray's launcher schema."""
    jsonschema.validate(_config(), json.loads(RAY_SCHEMA.read_text()))


def test_launcher_prepare_and_validate():
    """Ray's own prepare_config + validate_config (what `ray up` runs before any cloud call) accept it."""
    prepared = _prepared()
    validate_config(prepared)
    # prepare_config put the common setup commands in front of the head/worker ones.
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]


def test_provider_auth_and_scaling_fields():
    config = _config()
    assert config["cluster_name"]
    provider = config["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", provider["region"])
    zones = provider["availability_zone"].split(",")
    assert zones and all(zone.startswith(provider["region"]) for zone in zones)
    assert isinstance(provider["cache_stopped_nodes"], bool)
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["idle_timeout_minutes"] > 0
    assert config["max_workers"] >= 1
    assert "docker" not in config or not config["docker"], "the config is meant to run without Docker"


def test_cpu_head_and_gpu_workers():
    config = _config()
    node_types = config["available_node_types"]
    head_type = config["head_node_type"]
    assert head_type in node_types

    head = node_types[head_type]
    assert not GPU_FAMILY.match(head["node_config"]["InstanceType"]), "the head should be a CPU instance"
    assert head["resources"].get("GPU", 0) == 0

    workers = {name: nt for name, nt in node_types.items() if name != head_type}
    gpu_workers = {
        name: nt for name, nt in workers.items()
        if nt["resources"].get("GPU", 0) >= 1 or GPU_FAMILY.match(nt["node_config"]["InstanceType"])
    }
    assert gpu_workers, "no worker node type with GPUs"
    for name, nt in gpu_workers.items():
        assert GPU_FAMILY.match(nt["node_config"]["InstanceType"]), f"{name}: not a GPU instance type"
        assert nt["resources"].get("GPU", 0) >= 1, f"{name}: resources do not advertise a GPU"
        assert nt.get("min_workers", 0) == 0, f"{name}: GPU workers should scale from zero"
        assert nt["max_workers"] >= 1
        assert nt["max_workers"] <= config["max_workers"]


def test_setup_installs_gpu_extra_without_cpu_constraints():
    config = _config()
    assert config["file_mounts"].get("~/cca-ray") == ".", "the working copy is not synced to ~/cca-ray"
    commands = _all_setup_commands(config)
    installs = [cmd for cmd in commands if "pip install" in cmd and "cca-ray[gpu]" in cmd]
    assert installs, "no setup command installs cca-ray with the [gpu] extra"
    assert all("-e" in cmd.split() for cmd in installs), "the synced working copy should be installed -e"
    for cmd in commands:
        assert "constraints/cpu.txt" not in cmd, f"CPU constraints used on the GPU cluster: {cmd}"
        assert "PIP_CONSTRAINT=" not in cmd, f"a pip constraint is set on the GPU cluster: {cmd}"
        assert "cpu-vllm" not in cmd, f"the CPU vLLM extra is installed on the GPU cluster: {cmd}"


def test_start_commands():
    config = _config()
    head = config["head_start_ray_commands"]
    assert head[0].strip() == "ray stop"
    head_start = [cmd for cmd in head if "ray start" in cmd]
    assert len(head_start) == 1
    cmd = head_start[0]
    for flag in ("--head", "--port=6379", "--dashboard-host=0.0.0.0",
                 "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in cmd.split(), f"head start command lacks {flag}: {cmd}"

    worker = config["worker_start_ray_commands"]
    assert worker[0].strip() == "ray stop"
    assert any("ray start --address=$RAY_HEAD_IP:6379" in cmd for cmd in worker)


def test_token_auth_is_wired_up():
    """Ray 2.60 token auth: every node gets the token file and runs Ray with RAY_AUTH_MODE=token."""
    config = _config()
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in config[key] if "ray start" in cmd]
        assert all("RAY_AUTH_MODE=token" in cmd for cmd in starts), key
    text = _text()
    assert "ray get-auth-token --generate" in text
    assert "RAY_AUTH_MODE=token ray job submit" in text


def test_usage_comments():
    text = _text()
    for needle in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "8265", "ray down cluster.yaml",
                   "ray job submit --address http://127.0.0.1:8265 --working-dir .",
                   "cca-ray sweep", "s3://"):
        assert needle in text, f"usage comment lacks {needle!r}"


def test_onprem_block_is_a_valid_local_provider_config():
    """The commented on-prem block, swapped in as the comments say, passes Ray's launcher checks."""
    block = _onprem_block()
    provider = block["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"]
    assert provider["worker_ips"] and isinstance(provider["worker_ips"], list)
    assert block["auth"]["ssh_private_key"] and block["auth"]["ssh_user"]

    config = _config()
    del config["available_node_types"], config["head_node_type"]
    config.update(block)
    prepared = prepare_config(config)
    validate_config(prepared)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(provider["worker_ips"])


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        pytest.param(lambda c: c.pop("provider"), jsonschema.ValidationError, "provider", id="no-provider"),
        pytest.param(lambda c: c.pop("cluster_name"), jsonschema.ValidationError, "cluster_name",
                     id="no-cluster_name"),
        pytest.param(lambda c: c["available_node_types"]["ray.worker.gpu"].pop("resources"),
                     jsonschema.ValidationError, "resources", id="node-type-without-resources"),
        pytest.param(lambda c: c.update(setup_comands=[]), jsonschema.ValidationError, "setup_comands",
                     id="misspelt-field"),
        pytest.param(lambda c: c.update(head_node_type="ray.head.missing"), ValueError, "head_node_type",
                     id="unknown-head-type"),
    ],
)
def test_validation_rejects_broken_copies(mutate, error, match):
    """The validation above can fail: broken copies of the config are rejected by Ray's validate_config."""
    prepared = _prepared()
    validate_config(copy.deepcopy(prepared))  # the unbroken config passes
    broken = copy.deepcopy(prepared)
    mutate(broken)
    with pytest.raises(error, match=match):
        validate_config(broken)
