"""nim_build: Hugging Face checkpoint -> FP8 TensorRT-LLM checkpoint/engine -> Triton repository -> Helm chart."""

__version__ = "0.1.0"

# The TensorRT-LLM release line whose engine format we target (the last one that builds TensorRT engines).
TRTLLM_VERSION = "1.2.1"
TRTLLM_IMAGE = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
# KV-cache block size (TensorRT-LLM's default), used by the engine build and the reference runtime alike.
TOKENS_PER_BLOCK = 32
# TensorRT-LLM's kv_cache_free_gpu_mem_fraction default: the share of the memory left after loading the weights that
# the KV cache may take (the repository's parameter, the reference runtime's default, the chart's sizing).
KV_CACHE_FREE_MEM_FRACTION = 0.9
# What the reference runtime serves in (`serve`/`run --compute-dtype`, carried to the engine processes in this
# variable): auto = bf16 on a CPU with native bf16 matmul, float32 on other CPUs, the checkpoint's dtype on CUDA.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
COMPUTE_DTYPE_ENV = "NIM_BUILD_COMPUTE_DTYPE"
