"""Reference runtime: a PyTorch llama/mistral decoder that serves TensorRT-LLM checkpoints (FP8 included) with
in-flight batching and a paged KV cache, on CPU or CUDA. API: docs/RUNTIME_API.md."""

from nim_build.runtime.api import SamplingParams, TokenEvent, from_trtllm
from nim_build.runtime.engine import LLMEngine
from nim_build.runtime.model import DecoderModel, SeqChunk

__all__ = ["LLMEngine", "SamplingParams", "TokenEvent", "from_trtllm", "DecoderModel", "SeqChunk"]
