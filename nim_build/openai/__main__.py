"""`python -m nim_build.openai REPO ...`: the OpenAI API process that `nim_build serve` starts and supervises."""

from __future__ import annotations

import click


@click.command()
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="0.0.0.0")
@click.option("--port", type=int, required=True)
@click.option("--grpc-url", required=True, help="Triton's gRPC endpoint (loopback).")
@click.option("--triton-metrics-url", help="Triton's metrics, for the engine's queue and KV-cache gauges.")
@click.option("--served-model-name")
@click.option("--health-interval", type=float, default=15.0)
def main(repo, host, port, grpc_url, triton_metrics_url, served_model_name, health_interval):
    import uvicorn

    from nim_build.openai.app import OpenAIServer, ServedModel, create_app

    model = ServedModel.from_repo(repo, served_model_name)
    app = create_app(OpenAIServer(model, grpc_url, triton_metrics_url, health_interval))
    # uvicorn's own SIGTERM handling: stop accepting, let streams finish for a moment, then close them
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5, access_log=False)


if __name__ == "__main__":
    main()
