"""Options that more than one command takes, declared once."""

from __future__ import annotations

import click

from nim_build import COMPUTE_DTYPE_ENV, COMPUTE_DTYPES
from nim_build.deploy.profiles import GOALS, GPU_PRODUCTS, GPUS_ENV, PROFILE_ENV

compute_dtype_option = click.option(
    "--compute-dtype",
    type=click.Choice(COMPUTE_DTYPES),
    default="auto",
    show_default=True,
    envvar=COMPUTE_DTYPE_ENV,  # what the engine processes read: a value set for the container is not overridden
    show_envvar=True,
    help="What the reference engine computes in. auto: bf16 on a CPU with native bf16 matmul (AVX512-BF16, AMX; "
    "2-3x faster), float32 on other CPUs (float32 reproduces the accuracy gate's numbers), the checkpoint's dtype "
    "on CUDA.",
)


gpus_option = click.option(
    "--gpus",
    default="auto",
    show_default=True,
    help="The node: 'PRODUCT xCOUNT' (e.g. 'H100-SXM x8', 'L40S x2'), 'cpu', or 'auto' (this node: nvidia-smi, "
    f"or the description in {GPUS_ENV}). Products: {', '.join(p.name for p in GPU_PRODUCTS.values())}.",
)
profile_option = click.option(
    "--profile",
    envvar=PROFILE_ENV,
    help=f"Run this profile (a name or id from `nim_build profiles`) instead of the one chosen [env {PROFILE_ENV}].",
)
profile_goal_option = click.option(
    "--profile-goal",
    type=click.Choice(GOALS),
    default=GOALS[0],
    show_default=True,
    help="What the chosen profile optimises: throughput (the fewest GPUs that fit with a useful KV cache) or "
    "latency (the most GPUs the node has).",
)
