# Fake of tensorrt_llm/builder.py: BuildConfig with the real field names and defaults (subset), build(), Engine.
import copy
import json
import os
from dataclasses import dataclass, field, fields

from . import __version__
from ._fake_log import log
from .bindings import KVCacheType
from .plugin import PluginConfig


@dataclass
class BuildConfig:
    max_input_len: int = 1024
    max_seq_len: int = None
    opt_batch_size: int = 8
    max_batch_size: int = 2048
    max_beam_width: int = 1
    max_num_tokens: int = 8192
    opt_num_tokens: int | None = None
    max_prompt_embedding_table_size: int = 0
    kv_cache_type: KVCacheType = None
    gather_context_logits: int = False
    gather_generation_logits: int = False
    strongly_typed: bool = True
    plugin_config: PluginConfig = field(default_factory=PluginConfig)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["kv_cache_type"] = self.kv_cache_type.name if self.kv_cache_type is not None else None
        out["plugin_config"] = self.plugin_config.model_dump()
        return out


class Engine:
    def __init__(self, model, build_config: BuildConfig):
        self.model = model
        self.build_config = build_config

    def save(self, engine_dir: str):
        rank = self.model.config["mapping"]["rank"]
        log("save", rank=rank, engine_dir=engine_dir)
        if os.environ.get("FAKE_TRTLLM_SKIP_SAVE_RANK") == str(rank):
            return
        os.makedirs(engine_dir, exist_ok=True)
        if rank == 0:
            with open(os.path.join(engine_dir, "config.json"), "w") as f:
                json.dump(
                    {
                        "version": __version__,
                        "pretrained_config": self.model.config,
                        "build_config": self.build_config.to_dict(),
                    },
                    f,
                )
        with open(os.path.join(engine_dir, f"rank{rank}.engine"), "w") as f:
            json.dump(
                {
                    "rank": rank,
                    "pid": os.getpid(),
                    "checkpoint_dir": self.model.checkpoint_dir,
                    "build_config": self.build_config.to_dict(),
                },
                f,
            )


def build(model, build_config: BuildConfig) -> Engine:
    if not isinstance(build_config, BuildConfig) or not isinstance(build_config.plugin_config, PluginConfig):
        raise TypeError("build() takes a model and a BuildConfig with a PluginConfig")
    if not isinstance(build_config.kv_cache_type, KVCacheType):
        raise TypeError(f"kv_cache_type must be a KVCacheType, got {build_config.kv_cache_type!r}")
    log("build", rank=model.config["mapping"]["rank"], build_config=build_config.to_dict())
    return Engine(model, copy.deepcopy(build_config))
