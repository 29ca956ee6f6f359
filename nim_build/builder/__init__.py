"""The build pipeline, `nim_build engine`: one module per stage, in the order `pipeline.build()` runs them.

resolve (resolve.py, default_model.py)  MODEL -> a local directory of safetensors, config and tokenizer
spec (spec.py, families.py)             config.json -> ModelSpec, the family's tensor names
plan (plan.py)                          tensor-parallel split, validated before any weight is read
calibrate (calib_data.py, calibrate.py) activation ranges, one decoder layer at a time
quantize (quantize.py)                  FP8 scales and bytes, exactly as NVIDIA's exporter computes them
convert (convert.py, safetensors_io.py) the streamed TensorRT-LLM checkpoint writer
accuracy (accuracy.py)                  the quantized checkpoint against transformers' own forward pass
engine backends (backends.py, trtllm_adapter.py)  TensorRT-LLM engine, or the checkpoint itself (reference)
manifest (manifest.py)                  written last: the engine directory's contract with later stages
"""
