"""HTTP: the resource tree, requests, and the ``Site`` ASGI application."""
