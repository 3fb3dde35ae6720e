"""celora on Flower (Message API, flwr 1.42): the same strategies and payloads as the in-process engine.

- ``server_app:app`` — ServerApp; ``server.CeloraFlowerStrategy`` wraps any registered celora strategy.
- ``client_app:app`` — ClientApp; private factors (A, B, head) stay in ``context.state``.
- ``deploy`` / ``runner`` — a local SuperLink + SuperNodes (``celora run --runtime flower``).
- ``certs`` — test TLS certificates and SuperNode keys (``python -m celora.fl.flower.certs``).

Nothing here is imported by the in-process engine; ``flwr`` is needed only for this package.
"""
