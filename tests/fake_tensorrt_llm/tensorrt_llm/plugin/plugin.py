# Field names and defaults of the pydantic PluginConfig in tensorrt_llm/plugin/plugin.py (1.1/1.2), the subset
# that matters here. Unknown names are refused on assignment, as pydantic does for a model without that field.
_DEFAULTS = {
    "dtype": "float16",
    "bert_attention_plugin": "auto",
    "gpt_attention_plugin": "auto",
    "gemm_plugin": None,
    "nccl_plugin": "auto",
    "low_latency_gemm_plugin": None,
    "context_fmha": True,
    "paged_kv_cache": None,
    "remove_input_padding": True,
    "reduce_fusion": False,
    "tokens_per_block": 32,
    "use_paged_context_fmha": True,
    "use_fp8_context_fmha": True,
    "multiple_profiles": False,
    "paged_state": True,
    "streamingllm": False,
    "use_fused_mlp": True,
}


class PluginConfig:
    def __init__(self, **values):
        object.__setattr__(self, "_values", dict(_DEFAULTS))
        for name, value in values.items():
            setattr(self, name, value)

    def __setattr__(self, name, value):
        if name not in _DEFAULTS:
            raise ValueError(f'"PluginConfig" object has no field "{name}"')
        self._values[name] = value

    def __getattr__(self, name):
        values = self.__dict__.get("_values", {})
        if name not in values:
            raise AttributeError(name)
        return values[name]

    def model_dump(self) -> dict:
        return dict(self._values)
