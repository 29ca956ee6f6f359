"""Deployment: the serving node's engine cache (cache.py) and the Helm values sized from a build (chart.py)."""
