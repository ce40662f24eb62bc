"""Time and networking: the reactor facade over asyncio, and the test ``Clock``.

This layer knows nothing of sessions; its HTTP is uvicorn's, guarded by ``_http``.
"""
