"""helm/nim-llm with real helm v3.18 and the real Kubernetes schemas (1.28-1.33).

No Kubernetes API server runs here: these tests lint, render, validate and inspect the rendered objects.
They do not install the chart anywhere.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from helm_tools import (
    CHART,
    SERVICE_MONITOR_API,
    HelmError,
    by_kind,
    duplicate_keys,
    one,
    render,
    render_notes,
    render_text,
    run_helm,
    validate,
)

TOKEN_SECRET = {"huggingface": {"tokenSecret": {"name": "hf-token", "key": "token"}}}

# name -> (values, --api-versions)
MATRIX = {
    "defaults": ({}, ()),
    "tp2-existing-claim-token": (
        {
            "engine": {"tensorParallelSize": 2},
            "persistence": {"existingClaim": "llm-cache"},
            "replicaCount": 2,
            **TOKEN_SECRET,
        },
        (),
    ),
    "tp4-emptydir-spread-pdb-netpol": (
        {
            "engine": {"tensorParallelSize": 4},
            "persistence": {"enabled": False},
            "replicaCount": 3,
            "topologySpread": {"enabled": True},
            "pdb": {"enabled": True},
            "networkPolicy": {
                "enabled": True,
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            },
            "gpu": {"products": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"]},
            "priorityClassName": "llm-serving",
        },
        (),
    ),
    "tp8-statefulset-pvc": (
        {
            "engine": {"tensorParallelSize": 8},
            "workload": {"kind": "StatefulSet"},
            "replicaCount": 2,
            "persistence": {"size": "300Gi", "storageClass": "fast-ssd"},
        },
        (),
    ),
    "monitoring-with-crd": (
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
        (SERVICE_MONITOR_API,),
    ),
    "monitoring-without-crd": ({"metrics": {"serviceMonitor": {"enabled": True}}}, ()),
    "hpa-rwx": (
        {"autoscaling": {"enabled": True, "maxReplicas": 6}, "persistence": {"accessMode": "ReadWriteMany"}},
        (),
    ),
    "hpa-statefulset": ({"autoscaling": {"enabled": True}, "workload": {"kind": "StatefulSet"}}, ()),
    "ingress-http-grpc": (
        {
            "ingress": {
                "http": {"enabled": True, "host": "llm.example.com", "className": "nginx", "tlsSecretName": "llm-tls"},
                "grpc": {
                    "enabled": True,
                    "host": "grpc.llm.example.com",
                    "className": "nginx",
                    "tlsSecretName": "llm-grpc-tls",
                },
            }
        },
        (),
    ),
    "offline-existing-claim": (
        {
            "huggingface": {"offline": True},
            "persistence": {"existingClaim": "llm-cache"},
            "model": {"revision": "0" * 40},
        },
        (),
    ),
    "store-offline-profile": (
        {
            "model": {"store": "stores/nemo", "profile": "trtllm-h100-sxm-fp8-tp2-latency", "revision": "0" * 40},
            "engine": {"tensorParallelSize": 2},
            "huggingface": {"offline": True},
            "persistence": {"existingClaim": "llm-cache"},
        },
        (),
    ),
    "cpu-reference": (
        {
            "gpu": {"enabled": False},
            "engine": {"backend": "reference"},
            "image": {"tag": "0.1.0-cpu"},
            "tolerations": [],
            "persistence": {"enabled": False},
        },
        (),
    ),
    "custom-ports-digest": (
        {
            "service": {"ports": {"http": 9000, "grpc": 9001, "metrics": 9002, "openai": 9003}, "type": "NodePort"},
            "image": {"digest": "sha256:" + "a" * 64},
        },
        (),
    ),
}


def _merged(values: dict) -> dict:
    """values.yaml with the case's values merged over it (as helm does for maps)."""

    def merge(base, over):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    return merge(yaml.safe_load((CHART / "values.yaml").read_text()), values)


@pytest.fixture(scope="module")
def rendered():
    cache = {}

    def get(name):
        if name not in cache:
            values, apis = MATRIX[name]
            text = render_text(values, api_versions=apis)
            cache[name] = (text, [d for d in yaml.safe_load_all(text) if d])
        return cache[name]

    return get


def test_lint_strict(tmp_path):
    assert "0 chart(s) failed" in run_helm("lint", "--strict", str(CHART))
    for name in ("tp8-statefulset-pvc", "ingress-http-grpc"):
        values = tmp_path / f"{name}.yaml"
        values.write_text(yaml.safe_dump(MATRIX[name][0]))
        assert "0 chart(s) failed" in run_helm("lint", "--strict", str(CHART), "-f", str(values))


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"].startswith(">=1.28")
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["appVersion"])
    deployment = one(render(), "Deployment")
    images = {
        c["image"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        + deployment["spec"]["template"]["spec"]["initContainers"]
    }
    assert images == {f"nim-build:{chart['appVersion']}"}  # image tag defaults to appVersion


def test_long_release_name_keeps_names_within_63_characters():
    values = {"workload": {"kind": "StatefulSet"}, "ingress": {"http": {"enabled": True, "host": "llm.example.com"}}}
    objects = render(values, release="a" * 53)
    names = [o["metadata"]["name"] for o in objects] + [one(objects, "StatefulSet")["spec"]["serviceName"]]
    assert max(map(len, names)) <= 63 and len(set(names)) == 4  # fullname, -headless, -http, -test-inference
    assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names)


def test_kube_version_floor():
    with pytest.raises(HelmError, match="kubeVersion"):
        render(kube_version="1.27.0")


@pytest.mark.parametrize("case", list(MATRIX))
def test_render_validates_and_is_secure(case, rendered):
    text, objects = rendered(case)
    values = _merged(MATRIX[case][0])
    assert duplicate_keys(text) == []
    assert validate(objects) >= 3

    kind = values["workload"]["kind"]
    workload = one(objects, kind)
    pod = workload["spec"]["template"]["spec"]
    tp = values["engine"]["tensorParallelSize"]
    init = {c["name"]: c for c in pod["initContainers"]}["engine"]
    main = {c["name"]: c for c in pod["containers"]}["triton"]

    # GPUs: limit = tp on the serving and the build container; toleration; product affinity
    for c in (init, main):
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (tp if values["gpu"]["enabled"] else None)
    if values["gpu"]["enabled"]:
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    products = values["gpu"]["products"]
    if products:
        term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert term == [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": products}]}]
    else:
        assert "nodeAffinity" not in pod.get("affinity", {})
    assert main["args"][:2] == ["serve", "$(NIM_REPO_DIR)"]
    if values["model"]["store"]:  # the store's profile for this node (test_profiles.py runs the script)
        assert 'nim_build repo "$store"' in init["args"][0] and len(init["args"]) == 1
    else:
        assert "nim_build cache-engine" in init["args"][0] and '"$@"' in init["args"][0]
        assert init["args"][init["args"].index("--tp") + 1] == str(tp)  # the script's "$@": the engine values
    env = {e["name"]: e for e in init["env"]}

    # ports and probes
    ports = values["service"]["ports"]
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == ports
    assert main["args"][main["args"].index("--http-port") + 1] == str(ports["http"])
    assert main["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/v1/health/ready", "port": "openai"}
    assert main["args"][main["args"].index("--openai-port") + 1] == str(ports["openai"])
    assert main["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    budget = main["startupProbe"]["periodSeconds"] * main["startupProbe"]["failureThreshold"]
    assert budget >= 600
    assert main["args"][main["args"].index("--startup-timeout") + 1] == str(budget)
    service = [s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") != "None"][0]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        n: (port, n) for n, port in ports.items()
    }

    # security
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["initContainers"] + pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/dev/shm", values["persistence"]["mountPath"]}
    assert [m for m in main["volumeMounts"] if m["name"] == "cache"][0]["readOnly"] is True
    sa = one(objects, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False and pod["serviceAccountName"] == sa["metadata"]["name"]
    shm = [v for v in pod["volumes"] if v["name"] == "shm"][0]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": values["shm"]["sizeLimit"]}

    # no plain token anywhere; the token only through secretKeyRef, only in the init container
    for c in pod["initContainers"] + pod["containers"]:
        for e in c.get("env", []):
            assert not ("TOKEN" in e["name"] and "value" in e), e
    secret = values["huggingface"]["tokenSecret"]["name"]
    if secret:
        assert env["HF_TOKEN"]["valueFrom"] == {
            "secretKeyRef": {"name": secret, "key": values["huggingface"]["tokenSecret"]["key"]}
        }
    else:
        assert "HF_TOKEN" not in env
    assert "HF_TOKEN" not in {e["name"] for e in main["env"]}
    assert not by_kind(objects, "Secret")
    assert {e["name"]: e.get("value") for e in main["env"]}["HF_HUB_OFFLINE"] == "1"
    assert ("HF_HUB_OFFLINE" in env) == values["huggingface"]["offline"]

    # cache volume
    cache = [v for v in pod["volumes"] if v["name"] == "cache"]
    pvcs = by_kind(objects, "PersistentVolumeClaim")
    if not values["persistence"]["enabled"]:
        assert cache == [{"name": "cache", "emptyDir": {}}] and not pvcs
    elif values["persistence"]["existingClaim"]:
        assert cache[0]["persistentVolumeClaim"]["claimName"] == values["persistence"]["existingClaim"] and not pvcs
    elif kind == "StatefulSet":
        assert not cache and not pvcs
        (tmpl,) = workload["spec"]["volumeClaimTemplates"]
        assert tmpl["metadata"]["name"] == "cache"
        assert tmpl["spec"]["resources"]["requests"]["storage"] == (values["persistence"]["size"] or "100Gi")
        assert tmpl["spec"].get("storageClassName", "") == values["persistence"]["storageClass"]
    else:
        (pvc,) = pvcs
        assert cache[0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert pvc["spec"]["accessModes"] == [values["persistence"]["accessMode"]]
        assert pvc["spec"]["resources"]["requests"]["storage"] == (values["persistence"]["size"] or "100Gi")

    # optional objects
    assert len(by_kind(objects, "ServiceMonitor")) == int(case == "monitoring-with-crd")
    assert len(by_kind(objects, "HorizontalPodAutoscaler")) == int(values["autoscaling"]["enabled"])
    assert ("replicas" in workload["spec"]) != values["autoscaling"]["enabled"]
    assert len(by_kind(objects, "PodDisruptionBudget")) == int(values["pdb"]["enabled"])
    assert len(by_kind(objects, "NetworkPolicy")) == int(values["networkPolicy"]["enabled"])
    assert len(by_kind(objects, "Ingress")) == sum(values["ingress"][n]["enabled"] for n in ("http", "grpc"))

    # helm test pod: pinned images, readiness then one real inference, not selected by the Service
    (test_pod,) = [o for o in by_kind(objects, "Pod") if o["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    (wait,) = test_pod["spec"]["initContainers"]
    assert wait["image"].split(":")[-1] not in ("", "latest")
    assert wait["args"][-1].endswith(f":{ports['openai']}/v1/health/ready")
    infer, chat = test_pod["spec"]["containers"]
    assert infer["args"][0] == "infer" and infer["args"][infer["args"].index("--url") + 1].endswith(f":{ports['grpc']}")
    assert chat["args"][chat["args"].index("-d") - 1].endswith(f":{ports['openai']}/v1/chat/completions")
    body = json.loads(chat["args"][chat["args"].index("-d") + 1])
    assert body == {"messages": [{"role": "user", "content": values["tests"]["prompt"]}], "max_tokens": 32}
    selector = service["spec"]["selector"]
    assert not all(test_pod["metadata"]["labels"].get(k) == v for k, v in selector.items())


def test_init_script_runs_cache_engine_then_repo(rendered, tmp_path):
    """The init container's shell script, run with its rendered env and a stand-in nim_build that logs calls."""
    _, objects = rendered("tp2-existing-claim-token")
    init = one(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"] == ["/bin/sh", "-ec"]
    env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
    env["NIM_REPO_DIR"] = str(tmp_path / "repo")
    (tmp_path / "repo").mkdir()  # left over from an earlier start of the pod: replaced
    log = tmp_path / "calls.log"
    shim = tmp_path / "bin" / "nim_build"
    shim.parent.mkdir()
    shim.write_text(
        f'#!/bin/sh\nprintf "%s|" "$@" >> {log}\necho >> {log}\n'
        '[ "$1" = cache-engine ] && [ -n "$SHIM_FAIL" ] && exit 2\n'
        '[ "$1" = cache-engine ] && echo "/opt/nim/cache/engines/x y--key"\nexit 0\n'
    )
    shim.chmod(0o755)
    proc = subprocess.run(
        ["/bin/sh", "-ec", *init["args"]],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "PATH": f"{shim.parent}:/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    calls = [line.rstrip("|").split("|") for line in log.read_text().splitlines()]
    assert calls == [
        [
            "cache-engine",
            "mistralai/Mistral-Nemo-Instruct-2407",
            "--revision",
            "main",
            "--cache-dir",
            "/opt/nim/cache",
            "--accuracy-gate",
            "--no-allow-pickle",
            "--backend",
            "auto",
            "--calib-samples",
            "32",
            "--calib-seq-len",
            "256",
            "--kv-cache",
            "auto",
            "--max-batch-size",
            "64",
            "--max-num-tokens",
            "8192",
            "--quant",
            "fp8",
            "--tp",
            "2",
            "--workers",
            "1",
        ],
        ["repo", "/opt/nim/cache/engines/x y--key", "--out", str(tmp_path / "repo")],
    ]
    assert not (tmp_path / "repo").exists()

    log.unlink()  # a failed build fails the init container (Kubernetes retries it) and writes no repository
    proc = subprocess.run(
        ["/bin/sh", "-ec", *init["args"]],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "PATH": f"{shim.parent}:/usr/bin:/bin", "SHIM_FAIL": "1"},
    )
    assert proc.returncode != 0 and [line.split("|")[0] for line in log.read_text().splitlines()] == ["cache-engine"]


def test_servicemonitor_and_hpa_details(rendered):
    _, objects = rendered("monitoring-with-crd")
    sm = one(objects, "ServiceMonitor")
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert sm["metadata"]["labels"]["release"] == "prom"
    _, objects = rendered("hpa-statefulset")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "rel-nim-llm"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "nv_inference_queue_duration_us_per_request"
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["serviceName"] == "rel-nim-llm-headless"
    assert [s["spec"]["clusterIP"] for s in by_kind(objects, "Service") if "clusterIP" in s["spec"]] == ["None"]


def test_ingress_details(rendered):
    _, objects = rendered("ingress-http-grpc")
    ingresses = {i["metadata"]["name"]: i for i in by_kind(objects, "Ingress")}
    http, grpc = ingresses["rel-nim-llm-http"], ingresses["rel-nim-llm-grpc"]
    assert http["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "http"}
    assert grpc["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "grpc"}
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert grpc["spec"]["tls"] == [{"hosts": ["grpc.llm.example.com"], "secretName": "llm-grpc-tls"}]


# The schema rejects bad values before any template runs.
@pytest.mark.parametrize(
    "values, message",
    [
        ({"replicaCount": "two"}, "replicaCount: Invalid type. Expected: integer, given: string"),
        ({"replicas": 2}, "Additional property replicas is not allowed"),
        ({"persistence": {"size": "-10Gi"}}, "persistence.size: Does not match pattern"),
        ({"shm": {"sizeLimit": "-1Gi"}}, "shm.sizeLimit: Does not match pattern"),
        ({"engine": {"tensorParallelSize": 3}}, "engine.tensorParallelSize must be one of the following: 1, 2, 4, 8"),
        ({"persistence": {"existingClaim": "llm-cache", "size": "50Gi"}}, "persistence.size does not match"),
        (
            {"persistence": {"existingClaim": "llm-cache", "storageClass": "fast"}},
            "persistence.storageClass does not match",
        ),
        ({"gpu": {"enabled": True, "count": 2}}, "Additional property count is not allowed"),
        ({"workload": {"kind": "DaemonSet"}}, "workload.kind must be one of the following"),
        ({"service": {"ports": {"http": 70000}}}, "service.ports.http: Must be less than or equal to 65535"),
        ({"model": {"profileGoal": "fastest"}}, "model.profileGoal must be one of the following"),
        ({"model": {"store": "../etc"}}, "model.store: Does not match pattern"),
        ({"model": {"store": "/abs"}}, "model.store: Does not match pattern"),
    ],
    ids=[
        "replicas-two",
        "unknown-key",
        "negative-size",
        "negative-shm",
        "tp-3",
        "existing-claim-with-size",
        "existing-claim-with-storage-class",
        "unknown-nested-key",
        "bad-kind",
        "port-range",
        "profile-goal",
        "store-outside-the-volume",
        "store-absolute",
    ],
)
def test_schema_rejects(values, message):
    with pytest.raises(HelmError, match="values don't meet the specifications of the schema") as e:
        render(values)
    assert message in str(e.value)


# validateValues: settings the schema cannot relate, reported together in one message.
@pytest.mark.parametrize(
    "values, message",
    [
        ({"replicaCount": 2}, "cannot share a new ReadWriteOnce cache volume"),
        ({"autoscaling": {"enabled": True}}, "a Deployment with up to 4 replicas cannot share"),
        ({"resources": {"limits": {"nvidia.com/gpu": 2}}}, "set engine.tensorParallelSize instead"),
        ({"huggingface": {"offline": True}}, "huggingface.offline=true needs a pre-populated cache"),
        ({"gpu": {"enabled": False}, "engine": {"backend": "trtllm"}}, "engine.backend=trtllm needs gpu.enabled=true"),
        ({"pdb": {"enabled": True, "minAvailable": 1}}, "set only one of pdb.minAvailable and pdb.maxUnavailable"),
        ({"service": {"ports": {"grpc": 8000}}}, "must be four different ports"),
        ({"service": {"ports": {"openai": 8002}}}, "must be four different ports"),
        ({"workload": {"deploymentStrategy": "RollingUpdate"}}, "RollingUpdate starts the new pod"),
        ({"ingress": {"grpc": {"enabled": True}}}, "ingress.grpc.enabled=true needs ingress.grpc.host"),
        ({"gpu": {"products": ["NVIDIA-H200"]}, "affinity": {"nodeAffinity": {}}}, "set either gpu.products or"),
        ({"model": {"store": "s"}, "persistence": {"enabled": False}}, "model.store needs the store on the cache"),
    ],
)
def test_validate_values(values, message):
    with pytest.raises(HelmError, match="nim-llm: inconsistent values") as e:
        render(values)
    assert message in str(e.value)


def test_validate_values_lists_every_problem_in_one_message():
    with pytest.raises(HelmError) as e:
        render({"replicaCount": 2, "huggingface": {"offline": True}})
    text = str(e.value)
    assert text.count("nim-llm: inconsistent values") == 1
    assert "cannot share a new ReadWriteOnce" in text and "huggingface.offline=true" in text


def test_notes_commands():
    notes = render_notes()
    assert "kubectl port-forward -n llm svc/rel-nim-llm 8000:8000 8001:8001" in notes
    assert 'nim_build infer --url 127.0.0.1:8001 --prompt "What is the capital of France?"' in notes
    assert "curl -s -X POST http://127.0.0.1:8000/v2/models/ensemble/generate_stream" in notes
    assert "helm test -n llm rel" in notes
    assert "WARNING" not in notes
    notes = render_notes(
        {
            "service": {"ports": {"http": 9000, "grpc": 9001, "metrics": 9002, "openai": 9003}},
            "metrics": {"serviceMonitor": {"enabled": True}},
            "persistence": {"enabled": False},
        }
    )
    assert "svc/rel-nim-llm 9000:9000 9001:9001" in notes and "--url 127.0.0.1:9001" in notes
    assert "no ServiceMonitor was created" in notes and "every pod start downloads" in notes
    assert "no ServiceMonitor" not in render_notes(
        {"metrics": {"serviceMonitor": {"enabled": True}}}, api_versions=(SERVICE_MONITOR_API,)
    )


# -- documentation and schema cover every value ---------------------------------------------------------------

FREE_FORM = {
    "commonLabels",
    "podAnnotations",
    "podLabels",
    "nodeSelector",
    "resources",
    "podSecurityContext",
    "containerSecurityContext",
    "affinity",
    "persistence.annotations",
    "service.annotations",
    "serviceAccount.annotations",
    "metrics.serviceMonitor.labels",
    "ingress.http.annotations",
    "ingress.grpc.annotations",
}


def _leaves(d, prefix=""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and path not in FREE_FORM:
            yield from _leaves(v, path + ".")
        else:
            yield path


def _params():
    return re.findall(r"^\s*## @param (\S+) \[([^\]]+)\] (.+)$", (CHART / "values.yaml").read_text(), re.M)


def test_every_value_documented_in_values_yaml_and_readme():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = {name for name, _, _ in _params()}
    leaves = set(_leaves(values))
    assert leaves - documented == set(), "values without a ## @param line"
    assert documented - leaves == set(), "## @param lines for keys that do not exist"
    readme = (CHART / "README.md").read_text()
    table = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    assert table == documented, f"README parameters table differs: {sorted(table ^ documented)}"


def test_schema_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node, value, path):
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: unknown keys must be rejected"
            for k, v in value.items():
                assert k in node["properties"], f"{path}.{k} is not in values.schema.json"
                walk(node["properties"][k], v, f"{path}.{k}")
        assert "default" not in node, f"{path}: the schema must not carry defaults (values.yaml does)"

    walk(schema, values, "")
    for name, _, _ in _params():
        node = schema
        for k in name.split("."):
            node = node["properties"][k]
        assert node.get("description") or node.get("type") or node.get("oneOf"), name
