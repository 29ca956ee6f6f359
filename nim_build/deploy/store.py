"""The model store: several profiles of one model in one directory, chosen from on the node at start.

Layout (docs/PROFILES.md)::

    STORE/model_manifest.yaml     the model, the shared build options, every profile (options, id, what it needs,
                                  status: built, or build-on-node for a GPU this machine lacks); rewritten
                                  atomically after each profile is added, so it never names a profile half built
    STORE/config.json             the model's config.json: what selection plans with on the node
    STORE/tokenizer/              the tokenizer, once: each profile's tokenizer files are hard links to these
    STORE/profiles/<id>/          an engine directory (`nim_build engine` output, manifest.json last)
    STORE/profiles/.tmp-<id>-*/   a build in progress (removed by the next build: the store lock is held)
    STORE/.lock                   flock held while the store is being written

A store is valid at every instant: a profile is listed as built only once its directory has been renamed into
place, and a build killed at any point leaves a temporary directory that the next build removes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from nim_build.builder.manifest import MANIFEST, TOKENIZER_DIR, sha256_file
from nim_build.deploy import profiles as P
from nim_build.errors import UserError
from nim_build.options import BuildOptions, resolve_max_seq_len

STORE_MANIFEST = "model_manifest.yaml"
FORMAT = "nim_build.store"
FORMAT_VERSION = 1
PROFILES_DIR = "profiles"
BUILT, ON_NODE = "built", "build-on-node"


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / STORE_MANIFEST).is_file()


@dataclass
class Entry:
    profile: P.Profile
    status: str  # BUILT | ON_NODE

    def to_dict(self) -> dict:
        p = self.profile
        needs = {"gpu": p.gpu, "gpus": 0 if p.gpu == "cpu" else p.tp}
        if p.quant.startswith("fp8") and p.gpu != "cpu":
            needs["min_compute_capability"] = ".".join(map(str, P.FP8_MIN_COMPUTE_CAPABILITY))
        d = {**p.to_dict(), "status": self.status, "needs": needs}
        return d | ({"path": f"{PROFILES_DIR}/{p.id}"} if self.status == BUILT else {})


@dataclass
class Store:
    root: Path
    model: dict  # {source: what `nim_build engine` builds from, name: the engine's (and served model's) name}
    build: dict  # the shared build options
    entries: list[Entry]

    def spec(self):
        from nim_build.builder.spec import load_config, parse_config

        return parse_config(load_config(self.root), source=str(self.root / "config.json"))

    def max_seq_len(self) -> int:
        return resolve_max_seq_len(self.build.get("max_seq_len"), self.spec().max_position_embeddings)

    def profile_dir(self, profile: P.Profile) -> Path:
        return self.root / PROFILES_DIR / profile.id

    def built(self, profile: P.Profile) -> bool:
        return (self.profile_dir(profile) / MANIFEST).is_file()

    def write(self) -> None:
        """model_manifest.yaml, atomically (a private temporary file renamed over it)."""
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "build": self.build,
            "profiles": [e.to_dict() for e in self.entries],
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{STORE_MANIFEST}.", dir=self.root)
        os.fchmod(fd, 0o644)  # readable by the serving pods' user
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(tmp, self.root / STORE_MANIFEST)

    def set(self, profile: P.Profile, status: str) -> None:
        self.entries = [e for e in self.entries if e.profile.id != profile.id] + [Entry(profile, status)]
        self.write()


def load_store(root: str | os.PathLike) -> Store:
    root = Path(root)
    path = root / STORE_MANIFEST
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path} cannot be read ({e}); rebuild the store with `nim_build store`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a nim_build model store manifest")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format_version {data['format_version']}; upgrade nim_build to read it")
    store = Store(root, data["model"], data["build"], [])
    for d in data["profiles"]:
        store.entries.append(Entry(P.profile_from_dict({**d, "build": store.build}), d["status"]))
    return store


@contextmanager
def _locked(root: Path):
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is writing {root}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _source(model: str) -> tuple[str, str, dict]:
    """(what `nim_build engine` builds from: a hub id pinned to its commit, a local directory or `default`, the
    engine name, config.json) of MODEL, resolved (and downloaded) once."""
    from nim_build.builder.pipeline import default_out
    from nim_build.builder.resolve import resolve_model
    from nim_build.builder.spec import load_config

    resolved = resolve_model(model)
    if resolved.revision:  # a hub model: pinned, so that a build on the node builds the same weights
        source = f"{model.partition('@')[0]}@{resolved.revision}"
    elif Path(model).expanduser().is_dir():
        source = str(Path(model).expanduser().resolve())
    else:
        source = model
    return source, default_out(model).name, load_config(resolved.local_dir)


def create_or_open(root: Path, model: str, build: dict) -> Store:
    """The store at root for model: opened when it is one (same model and shared options), else created."""
    import json

    source, name, config = _source(model)
    if is_store(root):
        store = load_store(root)
        if store.model["source"] != source or store.build != build:
            raise UserError(
                f"{root} is a store of {store.model['source']} with other build options ({store.build}); "
                "add profiles with the same model and options, or choose another --out"
            )
        return store
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not a model store; choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    (root / PROFILES_DIR).mkdir(exist_ok=True)
    tmp = root / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, root / "config.json")
    store = Store(root, {"source": source, "name": name}, build, [])
    store.write()
    return store


def buildable_here(profile: P.Profile, here: P.Node | None = None) -> str | None:
    """Why this machine (`here`: detected) cannot build profile (a TensorRT-LLM engine builds on the GPU it runs
    on), or None."""
    if profile.backend == "reference":
        return None
    from nim_build.deploy.cache import tensorrt_llm_version

    reasons = P.node_reasons(profile, here or P.detect_node())
    if tensorrt_llm_version() is None:
        reasons.append("TensorRT-LLM is not installed")
    return "; ".join(reasons) or None


Build = Callable[[str, Path, BuildOptions, Path | None, str | None], None]


def add_profile(store: Store, profile: P.Profile, build: Build | None = None) -> Path:
    """Build profile into the store (the caller holds the store lock) unless it is there; returns its directory."""
    from nim_build.deploy.cache import run_engine_build

    target = store.profile_dir(profile)
    if store.built(profile):
        _log(f"{profile.name} is already in the store")
        return target
    profiles = store.root / PROFILES_DIR
    for stale in profiles.glob(f".tmp-{profile.id}-*"):  # a build that died (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # no manifest: never complete
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{profile.id}-", dir=profiles))
    try:
        out = tmp / "engine"
        opts = BuildOptions(
            model=store.model["source"], **store.build, **{k: getattr(profile, k) for k in P.PROFILE_FIELDS}
        )
        _log(f"building {profile.name} (id {profile.id})")
        (build or run_engine_build)(store.model["source"], out, opts, None, store.model["name"])
        if not (out / MANIFEST).is_file():
            raise UserError(f"the build of {profile.name} left no {MANIFEST}; the store was left unchanged")
        _share_tokenizer(store.root, out / TOKENIZER_DIR)
        os.rename(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store.set(profile, BUILT)
    _log(f"{profile.name} added: {target}")
    return target


def _share_tokenizer(root: Path, tokenizer: Path) -> None:
    """Keep the tokenizer once: the first profile's files become STORE/tokenizer, later profiles' identical files
    become hard links to them (each engine directory stays complete on its own)."""
    shared = root / TOKENIZER_DIR
    if not shared.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=root))
        shutil.copytree(tokenizer, tmp, dirs_exist_ok=True)
        os.rename(tmp, shared)
    for f in sorted(tokenizer.iterdir()):
        s = shared / f.name
        if f.is_file() and s.is_file() and not os.path.samefile(f, s) and sha256_file(f) == sha256_file(s):
            link = f.with_name(f".{f.name}.link")
            os.link(s, link)
            os.replace(link, f)


def build_store(
    model: str,
    root: str | os.PathLike,
    opts: BuildOptions,
    node: P.Node,
    wanted: list[str] | None = None,
    all_runnable: bool = False,
    goal: str = "throughput",
    build: Build | None = None,
) -> Store:
    """Build into the store at root the profiles `wanted` (names or ids), or every profile runnable on node, or the
    one selection would pick there; those this machine cannot build are listed as build-on-node."""
    root = Path(root)
    shared = P.shared_build(opts)
    store = create_or_open(root, model, shared)
    with _locked(root):
        store = load_store(root)  # as the last writer left it
        planned = P.plan(store.spec(), node, store.max_seq_len(), shared)
        if wanted:
            chosen = []
            for w in wanted:
                p = P.find([pl.profile for pl in planned], w)
                reasons = next(pl.reasons for pl in planned if pl.profile == p)
                if reasons:
                    raise UserError(f"profile {p.name} cannot run on {node.describe()}: {'; '.join(reasons)}")
                chosen.append(p)
        elif all_runnable:
            chosen = [pl.profile for pl in planned if pl.runnable]
        else:
            chosen = [P.select(planned, goal)[0]]
        for p in chosen:
            why = buildable_here(p)
            if why is None:
                add_profile(store, p, build)
            elif not any(e.profile.id == p.id for e in store.entries):
                _log(f"{p.name}: to build on the node ({why})")
                store.set(p, ON_NODE)
    return store


def choose(
    root: str | os.PathLike,
    node: P.Node | None = None,
    goal: str = "throughput",
    override: str | None = None,
    build: Build | None = None,
) -> tuple[P.Profile, Path]:
    """The profile to run on this node and its engine directory, built into the store first when it is listed
    build-on-node or when no stored profile can run here (the best one for this node then)."""
    store = load_store(root)
    node = node or P.detect_node()
    spec, max_seq_len = store.spec(), store.max_seq_len()
    stored = [P.evaluate(e.profile, spec, node, max_seq_len) for e in store.entries]
    for e, pl in zip(store.entries, stored):
        if e.status == BUILT and not store.built(e.profile):
            pl.reasons.append(
                f"its directory {store.profile_dir(e.profile)} is incomplete: run `nim_build store` again"
            )
    if override and not any(override in (pl.profile.name, pl.profile.id) for pl in stored):
        candidates = P.plan(spec, node, max_seq_len, store.build)  # asked for one the store lacks: built here
    elif override or any(pl.runnable for pl in stored):
        candidates = stored
    else:
        _log(f"no profile in the store runs on {node.describe()}; choosing one of those planned for this node")
        candidates = P.plan(spec, node, max_seq_len, store.build)
    profile, rejected = P.select(candidates, goal, override)
    _log(f"node: {node.describe()}; profile: {profile.name} (id {profile.id})")
    for p, why in rejected:
        _log(f"  not {p.name}: {why}")
    if store.built(profile):
        return profile, store.profile_dir(profile)
    why = buildable_here(profile, node)
    if why:
        raise UserError(f"{profile.name} is not built in {store.root} and cannot be built on this node: {why}")
    with _locked(store.root):
        return profile, add_profile(load_store(root), profile, build)


def _log(msg: str) -> None:
    print(f"[nim_build store] {msg}", file=sys.stderr, flush=True)
