# Fake of tensorrt_llm.models.LLaMAForCausalLM.from_checkpoint (PretrainedModel.from_checkpoint's signature).
import json
import os

from .._fake_log import log


class LLaMAForCausalLM:
    def __init__(self, config: dict, checkpoint_dir: str):
        self.config = config
        self.checkpoint_dir = checkpoint_dir

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, rank=None, config=None, *, preprocess_weights_hook=None):
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            config = json.load(f)
        config["mapping"]["rank"] = rank
        weights = os.path.join(ckpt_dir, f"rank{rank}.safetensors")
        assert os.path.isfile(weights), weights
        log("from_checkpoint", rank=rank, ckpt_dir=ckpt_dir)
        return cls(config, ckpt_dir)
