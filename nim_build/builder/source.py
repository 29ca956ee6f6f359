"""The checkpoint a build reads, opened once: every later stage gets this object instead of a path.

`open_source(dir)` reads config.json once (ModelSpec and the raw dict transformers' layers are built from), looks
the family up once, opens the weights once and checks every tensor's shape against the spec (a missing or
truncated shard fails here, before any work), and loads the tokenizer when the directory has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nim_build.builder import families as F
from nim_build.builder.families import Family
from nim_build.builder.safetensors_io import CheckpointReader
from nim_build.builder.spec import ModelSpec, load_config, parse_config
from nim_build.errors import CheckpointError

WEIGHT_DTYPES = ("BF16", "F16", "F32")  # safetensors dtypes of an HF checkpoint's weights


@dataclass
class SourceModel:
    dir: Path
    config: dict  # config.json as written by its producer
    spec: ModelSpec
    family: Family
    reader: CheckpointReader
    tokenizer: object | None  # nim_build.serving.tokenizer.Tokenizer, or None without tokenizer files
    tokenizer_meta: dict | None  # its kind, bos / end / pad ids and chat template (the manifest's tokenizer section)

    def close(self) -> None:
        self.reader.close()


def open_source(model_dir: str | Path) -> SourceModel:
    from nim_build.serving.tokenizer import Tokenizer, detect_meta

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    spec = parse_config(config, source=str(model_dir / "config.json"))
    family = F.family_for(spec.architecture)
    reader = CheckpointReader(model_dir)
    try:
        check_shapes(reader, spec, family)
        meta = detect_meta(model_dir, bos_id=spec.bos_token_id, end_id=spec.eos_token_id, pad_id=spec.pad_token_id)
        tokenizer = Tokenizer.from_dir(model_dir, meta) if meta else None
    except BaseException:
        reader.close()
        raise
    return SourceModel(model_dir, config, spec, family, reader, tokenizer, meta)


def check_shapes(reader: CheckpointReader, spec: ModelSpec, fam: Family) -> None:
    """Every tensor the conversion reads exists with the shape config.json implies."""
    H, I = spec.hidden_size, spec.intermediate_size
    expected = {fam.embed: [spec.vocab_size, H], fam.final_norm: [H]}
    if not spec.tie_word_embeddings and fam.lm_head in reader:
        expected[fam.lm_head] = [spec.vocab_size, H]
    for i in range(spec.num_hidden_layers):
        expected.update(
            {
                fam.layer(i, F.Q): [spec.q_size, H],
                fam.layer(i, F.K): [spec.kv_size, H],
                fam.layer(i, F.V): [spec.kv_size, H],
                fam.layer(i, F.O): [H, spec.q_size],
                fam.layer(i, F.GATE): [I, H],
                fam.layer(i, F.UP): [I, H],
                fam.layer(i, F.DOWN): [H, I],
                fam.layer(i, F.INPUT_NORM): [H],
                fam.layer(i, F.POST_NORM): [H],
            }
        )
    for name, shape in expected.items():
        if reader.dtype(name) not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"tensor {name} has dtype {reader.dtype(name)}; model weights are {', '.join(WEIGHT_DTYPES)}"
            )
        got = reader.shape(name)
        if list(got) != shape:
            raise CheckpointError(
                f"tensor {name} has shape {got}, config.json implies {shape}; "
                "the config and the weights do not belong together"
            )
