"""Serving with Triton: the tokenizer (tokenizer.py), the model repository generator (repo.py), the python models it
copies (models/, package data), the native postprocessing backend (native/), the server (server.py) and the
client (client.py)."""
