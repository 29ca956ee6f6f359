"""Reference runtime: a PyTorch llama/mistral decoder that serves TensorRT-LLM checkpoints (FP8 included) with
in-flight batching and a paged KV cache, on CPU or CUDA. API: docs/RUNTIME_API.md."""

from nim_build.runtime.engine import LLMEngine, TokenEvent
from nim_build.runtime.model import DecoderModel, SeqChunk
from nim_build.runtime.sampling import SamplingParams

__all__ = ["LLMEngine", "SamplingParams", "TokenEvent", "DecoderModel", "SeqChunk"]
