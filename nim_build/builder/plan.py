"""The parallel plan, validated up front so a bad --tp fails in a second, not after an hour of conversion."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nim_build.builder.spec import ModelSpec
from nim_build.errors import ConfigError
from nim_build.options import TP_SIZES


@dataclass(frozen=True)
class ParallelPlan:
    tp: int
    kv_heads_per_rank: int  # after replication
    kv_replication: int  # how many times each KV head is repeated (1 = none)
    padded_vocab_size: int  # lm_head rows, a multiple of tp

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(spec: ModelSpec, tp: int) -> ParallelPlan:
    """How the model splits over tp ranks (--quant and --kv-cache are checked with the other options)."""
    if tp not in TP_SIZES:
        raise ConfigError(f"--tp {tp} is not supported; choose one of {', '.join(map(str, TP_SIZES))}")
    nh, nkv = spec.num_attention_heads, spec.num_key_value_heads
    if nh % tp:
        raise ConfigError(f"--tp {tp} does not divide num_attention_heads={nh}; choose a tp that divides {nh}")
    if spec.intermediate_size % tp:
        raise ConfigError(f"--tp {tp} does not divide intermediate_size={spec.intermediate_size}")
    if nkv >= tp:
        if nkv % tp:
            raise ConfigError(
                f"--tp {tp} does not divide num_key_value_heads={nkv}, and KV heads can only be "
                f"replicated when tp is a multiple of them; choose a tp that divides {nkv}"
            )
        replication = 1
    else:
        if tp % nkv:
            raise ConfigError(
                f"cannot replicate num_key_value_heads={nkv} over --tp {tp}: tp must be a multiple "
                f"of the KV heads when it exceeds them"
            )
        replication = tp // nkv
    padded_vocab = -(-spec.vocab_size // tp) * tp
    return ParallelPlan(
        tp=tp, kv_heads_per_rank=max(nkv // tp, 1), kv_replication=replication, padded_vocab_size=padded_vocab
    )
