"""Time and networking: the reactor facade over asyncio, and the test ``Clock``.

This layer knows nothing of HTTP or sessions.
"""
