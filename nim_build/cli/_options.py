"""Options that more than one command takes, declared once."""

from __future__ import annotations

import click

from nim_build import COMPUTE_DTYPES

compute_dtype_option = click.option(
    "--compute-dtype",
    type=click.Choice(COMPUTE_DTYPES),
    default="auto",
    show_default=True,
    help="What the reference engine computes in. auto: bf16 on a CPU with native bf16 matmul (AVX512-BF16, AMX; "
    "2-3x faster), float32 on other CPUs (float32 reproduces the accuracy gate's numbers), the checkpoint's dtype "
    "on CUDA.",
)
