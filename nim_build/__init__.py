"""nim_build: Hugging Face checkpoint -> FP8 TensorRT-LLM checkpoint/engine -> Triton repository -> Helm chart."""

__version__ = "0.1.0"

# The TensorRT-LLM release line whose engine format we target (the last one that builds TensorRT engines).
TRTLLM_VERSION = "1.2.1"
TRTLLM_IMAGE = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
# KV-cache block size (TensorRT-LLM's default), used by the engine build and the reference runtime alike.
TOKENS_PER_BLOCK = 32
