"""The OpenAI-compatible API in front of a Triton repository (`nim_build serve --openai-port`, docs/OPENAI.md)."""

DEFAULT_OPENAI_PORT = 9000  # Triton's OpenAI frontend's default
