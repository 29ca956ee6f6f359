"""Checks of an ONNX export, run by every `--backend onnx` build before its manifest is written.

`check_export`: onnx's own full check (graph, types, shape inference, the external-data references), then every
tensor's span inside the external-data file and the file against the sha256 the converter computed as it wrote the
checkpoint (the data file is that checkpoint file) - a corrupted or truncated file fails the build, not the first
session that loads it.

`OrtDecoder`: the exported graph run by ONNX Runtime (CPU), for the accuracy gate: logits and hidden states of a
token batch, with an empty KV cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from nim_build.builder.manifest import sha256_file
from nim_build.builder.onnx_export import DATA_FILE, MODEL_FILE, ORT_CPU_DTYPES
from nim_build.errors import NimBuildError


class ExportCheckError(NimBuildError, RuntimeError):
    """The build's own ONNX file failed its check: a bug or a corrupted disk, not the user's input."""


def check_export(onnx_dir: str | Path, data_sha256: str) -> None:
    import onnx

    onnx_dir = Path(onnx_dir)
    model_path, data_path = onnx_dir / MODEL_FILE, onnx_dir / DATA_FILE
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportCheckError(f"{model_path} fails onnx.checker: {' '.join(str(e).split())[:500]}") from None
    size = os.path.getsize(data_path)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in t.external_data}
            end = int(entry["offset"]) + int(entry["length"])
            if entry["location"] != DATA_FILE or end > size:
                raise ExportCheckError(
                    f"{model_path}: tensor {t.name} points at {entry['location']} bytes {entry['offset']}..{end}, "
                    f"outside {DATA_FILE} ({size} bytes): the export is corrupt; rebuild it"
                )
    actual = sha256_file(data_path)
    if actual != data_sha256:
        raise ExportCheckError(
            f"{data_path} is not the checkpoint as written (sha256 {actual[:12]}..., written {data_sha256[:12]}...): "
            "the disk or another process corrupted it; rebuild it"
        )


class OrtDecoder:
    """The export in an ONNX Runtime CPU session, its hidden states made outputs of a private copy of the graph
    (written beside the data file, removed once the session holds it)."""

    def __init__(self, onnx_dir: str | Path, hidden_states: list[str] | None = None):
        import onnx
        import onnxruntime as ort
        from onnx import helper

        onnx_dir = Path(onnx_dir)
        model = onnx.load(str(onnx_dir / MODEL_FILE), load_external_data=False)
        self.past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
        elem = self.past[0].type.tensor_type.elem_type if self.past else onnx.TensorProto.FLOAT
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if np.dtype(dtype).name not in ORT_CPU_DTYPES:
            raise ExportCheckError(f"ONNX Runtime's CPU kernels do not run {np.dtype(dtype).name} graphs")
        self.np_dtype = dtype
        self.kv_shape = [d.dim_value for d in self.past[0].type.tensor_type.shape.dim] if self.past else []
        self.hidden = list(hidden_states or [])
        path = onnx_dir / MODEL_FILE
        if self.hidden:
            for name in self.hidden:
                model.graph.output.append(helper.make_empty_tensor_value_info(name))
            path = onnx_dir / f".gate-{os.getpid()}.onnx"
            path.write_bytes(model.SerializeToString())
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        finally:
            if path.name != MODEL_FILE:
                path.unlink(missing_ok=True)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """batch [B, S] int64 -> logits [B*S, vocab] float32 and the hidden states, each [B*S, hidden] float32."""
        ids = batch.numpy().astype(np.int64)
        b, s = ids.shape
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((b, s), np.int64),
            "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
        }
        _, kv_heads, _, head_size = self.kv_shape
        for p in self.past:
            feeds[p.name] = np.zeros((b, kv_heads, 0, head_size), self.np_dtype)
        logits, *hidden = self.session.run(["logits", *self.hidden], feeds)
        flat = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float().reshape(b * s, -1)  # noqa: E731
        return flat(logits), [flat(h) for h in hidden]
