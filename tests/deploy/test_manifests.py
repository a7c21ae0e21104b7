"""deploy/: the Dockerfile's and the Kubernetes manifests' node commands are ones bin/e3-node accepts
(the manifests themselves are not run here: no container runtime or cluster on these machines)."""
import re
from pathlib import Path

import pytest
import yaml

from e3.runtime.cli import build_config, parse_args

DEPLOY = Path(__file__).parents[2] / "deploy"


def containers(name):
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            spec = doc["spec"]["template"]["spec"]
            return spec, {c["name"]: c for c in spec["containers"]}


@pytest.mark.parametrize("name", ["coordinator.yaml", "members.yaml"])
def test_each_node_command_parses_and_validates_with_an_owner_only_token_copy(name, tmp_path):
    spec, nodes = containers(name)
    node = nodes["e3"]
    args = [a.replace("$(POD_IP)", "10.1.2.3") for a in node["args"]]
    token = args[args.index("--cluster-token-file") + 1]
    init = " ".join(spec["initContainers"][0]["command"])
    assert f"chmod 600 {token}" in init                       # the node refuses a group-readable token
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    assert mounts[str(Path(token).parent)] == "token-copy"
    config = build_config(parse_args(args))                  # the CLI's own validation, as at start
    assert config.cluster.token_file == token


def test_members_join_the_coordinators_service_and_the_coordinator_binds_all_interfaces():
    _, coord = containers("coordinator.yaml")
    _, member = containers("members.yaml")
    c, m = coord["e3"]["args"], member["e3"]["args"]
    assert c[c.index("--host") + 1] == "0.0.0.0" and "--no-replan" not in c     # it plans over its members
    port = c[c.index("--port") + 1]
    assert m[m.index("--join") + 1] == f"http://e3-coordinator:{port}"
    assert coord["e3"]["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_the_image_runs_the_node_module_and_bakes_the_default_model():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'ENTRYPOINT \["python3", "-m", "e3\.runtime\.cli"', text)
    assert "resolve('default')" in text and "download.pytorch.org/whl/cpu torch==2.13.0" in text
