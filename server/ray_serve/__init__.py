"""Easel on Ray Serve (the `[ray]` extra): ingress replicas running the FastAPI app over GPU worker replicas that
hold the pipeline caches, with model-aware routing. app.py builds and runs the application from ingress.py and
worker.py; remote_engine.py is the ingress side's engine client; protocol.py is what the two send each other.

This package, protocol.py and remote_engine.py import neither Ray nor torch; the deployments import Ray, and a worker
replica imports torch when it starts (as `server.app` does when it starts the engine).
"""
