"""TensorRT engines from the ONNX export (`--backend onnx --tensorrt`): the only module that imports `tensorrt`,
always inside a function.

The network is strongly typed, so every tensor keeps the type the graph gives it and the Q/DQ pairs alone say
where FP8 runs (TensorRT fuses DequantizeLinear -> MatMul into an FP8 GEMM); one optimization profile spans
prefill and decode, from one token to max_seq_len, sized from the build's max_batch_size:

    builder = trt.Builder(logger); network = builder.create_network(1 << STRONGLY_TYPED)
    trt.OnnxParser(network, logger).parse_from_file("onnx/model.onnx")    # external data beside it
    profile.set_shape(input, min, opt, max) for every input; config.add_optimization_profile(profile)
    builder.build_serialized_network(network, config) -> onnx/model.plan

Without TensorRT or a GPU, `require` fails before any work with the `trtexec` command that builds the same engine
where they exist (`profile_shapes` is the one source of the shapes for both).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

from nim_build.builder.onnx_export import GENAI_CONFIG, MODEL_FILE
from nim_build.errors import BackendUnavailableError, NimBuildError

PLAN_FILE = "model.plan"
TENSORRT_IMAGE = "nvcr.io/nvidia/tensorrt:25.12-py3"  # NGC's TensorRT container, trtexec included


def unavailable_reason() -> str | None:
    """Why this machine cannot build TensorRT engines, or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def profile_shapes(onnx_dir: Path, *, max_batch_size: int, max_seq_len: int) -> dict[str, tuple[tuple, ...]]:
    """input name -> (min, opt, max) shape: one token to max_seq_len, optimized for decode at half the context."""
    decoder = json.loads((Path(onnx_dir) / GENAI_CONFIG).read_text())["model"]["decoder"]
    b, s = max_batch_size, max_seq_len
    shapes = {name: ((1, 1), (b, 1), (b, s)) for name in ("input_ids", "position_ids")}
    shapes["attention_mask"] = ((1, 1), (b, s // 2 + 1), (b, s))
    kv, d = decoder["num_key_value_heads"], decoder["head_size"]
    for i in range(decoder["num_hidden_layers"]):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{i}.{kind}"] = ((1, kv, 0, d), (b, kv, s // 2, d), (b, kv, s - 1, d))
    return shapes


def trtexec_command(shapes: dict[str, tuple[tuple, ...]], onnx_dir: Path) -> str:
    """The trtexec command line that builds the same engine (every onnx build records it in its manifest)."""
    args = ["trtexec", f"--onnx={onnx_dir / MODEL_FILE}", "--stronglyTyped", f"--saveEngine={onnx_dir / PLAN_FILE}"]
    for k, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
        args.append(flag + "=" + ",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in shapes.items()))
    return shlex.join(args)


def require(out: Path) -> None:
    """Fail before any work when --tensorrt cannot run here."""
    why = unavailable_reason()
    if why is not None:
        raise BackendUnavailableError(
            f"--tensorrt cannot build here: {why}. Build without --tensorrt, then on an NVIDIA GPU "
            f'(e.g. docker run --rm --gpus all -v "$PWD":/work -w /work {TENSORRT_IMAGE}): '
            f"trtexec --onnx={out}/onnx/{MODEL_FILE} --stronglyTyped --saveEngine={out}/onnx/{PLAN_FILE} with the "
            "shapes the build records in manifest.json (onnx.trtexec)"
        )


def build_engine(onnx_dir: Path, *, max_batch_size: int, max_seq_len: int) -> dict:
    """onnx_dir/model.plan from onnx_dir/model.onnx; returns what the manifest records."""
    import tensorrt as trt

    onnx_dir = Path(onnx_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_dir / MODEL_FILE)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NimBuildError(f"TensorRT's ONNX parser refused {onnx_dir / MODEL_FILE}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(onnx_dir, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise NimBuildError("TensorRT could not build an engine from the ONNX graph (its log above says why)")
    (onnx_dir / PLAN_FILE).write_bytes(bytes(plan))
    return {"plan_file": PLAN_FILE, "tensorrt": trt.__version__, "strongly_typed": True, "profile": shapes}
