"""Resolve MODEL (a local directory, a hub id `org/name[@revision]`, or `default`) to a local directory that
holds only safetensors weights, config and tokenizer files."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from nim_build.builder.default_model import is_default_model
from nim_build.builder.safetensors_io import INDEX_FILE
from nim_build.errors import CheckpointError, UserError
from nim_build.serving.tokenizer import TOKENIZER_FILES

# Everything a build needs and nothing more (no *.bin, no consolidated.safetensors duplicates, no *.gguf).
WEIGHT_PATTERNS = ["model*.safetensors", INDEX_FILE]
HUB_PATTERNS = ["config.json", *WEIGHT_PATTERNS, *TOKENIZER_FILES]
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@dataclass(frozen=True)
class ResolvedModel:
    source: str  # what the user typed
    local_dir: Path
    revision: str | None  # hub commit sha, None for local directories


def resolve_model(model: str, allow_pickle: bool = False, cache_dir: Path | None = None) -> ResolvedModel:
    """cache_dir: the huggingface_hub cache a hub model is read from and downloaded into [default: HF_HUB_CACHE]."""
    if is_default_model(model):
        from nim_build.builder.default_model import materialize_default_model

        return ResolvedModel(model, Path(materialize_default_model()), None)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"MODEL {model} is a file; point it at a model directory or a hub id like org/name")
        local = path.resolve()
        check_inside(local, local)
        return ResolvedModel(model, _ensure_safetensors(local, allow_pickle), None)
    repo_id, _, revision = model.partition("@")
    check_repo_id(repo_id, model)
    if revision:
        check_revision(revision)
    local, sha = _download(repo_id, revision or None, allow_pickle, cache_dir=cache_dir)
    check_complete(local, repo_id)
    check_inside(local, local.parent.parent)  # a snapshot's files link into its repository's blobs/
    return ResolvedModel(model, _ensure_safetensors(local, allow_pickle), sha)


def check_repo_id(repo_id: str, model: str | None = None) -> None:
    """A hub id as the Hub spells them (org/name), or a UserError: before any path or request is made from it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("not org/name")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"MODEL {model or repo_id!r} is neither an existing directory nor a hub id like "
            "'mistralai/Mistral-Nemo-Instruct-2407[@revision]'"
        ) from None


# A git commit, or a ref name as `git check-ref-format` allows it (branches, tags, refs/pr/N).
_REF = re.compile(r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*\.lock$)(?!.*/$)(?!.*@\{)[A-Za-z0-9._/-]+$")


def check_revision(revision: str) -> None:
    """A revision is a commit or a git ref name, never a path: checked before a cache path is made from it."""
    if (
        not _REF.match(revision)
        or revision.startswith(("-", "."))
        or any(p.startswith(".") for p in revision.split("/"))
    ):
        raise UserError(f"revision {revision!r} is not a git commit, branch or tag name")


def check_inside(model_dir: Path, root: Path) -> None:
    """Refuse input files that resolve outside root (a link to a file elsewhere on the machine would be copied
    into the engine, and from there into a repository shipped to a cluster)."""
    root = root.resolve()
    for path in input_files(model_dir):
        target = path.resolve()
        if not target.is_relative_to(root):
            raise CheckpointError(
                f"{path} links to {target}, outside {root}; copy the file into the model directory instead of "
                "linking it"
            )


def model_config(model: str) -> dict:
    """MODEL's config.json without its weights (a hub model: only that file is fetched): what profiles plan with."""
    from nim_build.builder.spec import load_config

    if is_default_model(model):
        from nim_build.builder.default_model import materialize_default_model

        return load_config(materialize_default_model())
    path = Path(model).expanduser()
    if path.is_dir():
        return load_config(path)
    repo_id, _, revision = model.partition("@")
    check_repo_id(repo_id, model)
    if revision:
        check_revision(revision)
    return load_config(_download(repo_id, revision or None, False, ["config.json"])[0])


def check_complete(model_dir: Path, repo_id: str) -> None:
    """Refuse a hub snapshot that lacks a file a build reads (an offline cache copied in part, an interrupted
    download): one message naming the file and the command that fetches it. A tokenizer is looked for only when
    the snapshot has a tokenizer_config.json (models without one build without the accuracy gate)."""
    from nim_build.jsonfile import read_object

    fetch = f"fetch it with `nim_build download {repo_id} --cache DIR` and point HF_HUB_CACHE at DIR"
    missing = [n for n in ("config.json",) if not (model_dir / n).is_file()]
    if (model_dir / INDEX_FILE).is_file():
        shards = set((read_object(model_dir / INDEX_FILE).get("weight_map") or {}).values())
        missing += sorted(s for s in shards if not (model_dir / s).is_file())
    elif not any(model_dir.glob("*.safetensors")):
        missing.append("model.safetensors")
    tokenizers = ("tokenizer.json", "tekken.json", "tokenizer.model")
    if (model_dir / "tokenizer_config.json").is_file() and not any((model_dir / n).is_file() for n in tokenizers):
        missing.append("tokenizer.json")
    if missing:
        raise CheckpointError(f"{repo_id}: {', '.join(missing)} missing from {model_dir}; {fetch}")


def _download(
    repo_id: str,
    revision: str | None,
    allow_pickle: bool,
    patterns: list[str] | None = None,
    cache_dir: Path | None = None,
) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    prefetch = (
        f"pre-fetch it on a connected machine with `hf download {repo_id}"
        f"{' --revision ' + revision if revision else ''}` and copy the HF_HOME cache here"
    )
    patterns = patterns or HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir))
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its license on the Hub and set HF_TOKEN to a token that has access"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} was not found on the Hub (or is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"revision {revision!r} of {repo_id} does not exist") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable"
        raise UserError(f"{why} and no cached copy of {repo_id} exists; {prefetch}") from None
    except OSError as e:  # connection errors surface as OSError subclasses (requests/httpx)
        raise UserError(f"could not download {repo_id} ({type(e).__name__}); {prefetch}") from None
    return local, local.name


def _ensure_safetensors(model_dir: Path, allow_pickle: bool) -> Path:
    """Refuse pickle weights unless allowed; when allowed, convert them once into a safetensors sibling."""
    if any(model_dir.glob("*.safetensors")) or not (model_dir / "config.json").is_file():
        return model_dir  # a missing config.json is reported by the spec parser with its own message
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{model_dir} has no *.safetensors weights")
    if not allow_pickle:
        raise UserError(
            f"{model_dir} holds only pickle weights ({bins[0].name}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    return _pickle_to_safetensors(model_dir, bins)


def _pickle_to_safetensors(model_dir: Path, bins: list[Path]) -> Path:
    """A safetensors copy of a pickle checkpoint, made once in nim_build's cache (never beside the user's model),
    keyed by the directory and each file's size and mtime: weights changed in place are converted again."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from nim_build import paths
    from nim_build.outputs import output_dir

    files = sorted(f for f in model_dir.iterdir() if f.is_file())
    stamp = [str(model_dir)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    out = (
        paths.cache_root()
        / "pickle-converted"
        / f"{model_dir.name}-{hashlib.sha256(str(stamp).encode()).hexdigest()[:16]}"
    )
    if (out / "config.json").is_file():
        return out
    with output_dir(out, force=True) as tmp:
        for i, b in enumerate(bins):
            state = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / f"model-{i:05d}.safetensors")
        for f in files:
            if not f.name.startswith("pytorch_model"):
                shutil.copy2(f, tmp / f.name)
    return out


def input_files(model_dir: Path) -> list[Path]:
    """Every file a build of model_dir may read: config, weights (+ index; pickle ones, read with --allow-pickle)
    and tokenizer files, sorted."""
    names = ["config.json", INDEX_FILE, *TOKENIZER_FILES]
    weights = {p for pattern in ["*.safetensors", *PICKLE_PATTERNS] for p in model_dir.glob(pattern) if p.is_file()}
    return sorted({model_dir / n for n in names if (model_dir / n).is_file()} | weights)
