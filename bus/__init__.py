"""The internal bus, shared by the broker, the edges and the workers: its wire format
(``wire``), ZeroMQ sockets on an asyncio loop (``loopsock``), CURVE keys and
authentication (``curve``) and the processes' log set-up (``logsetup``)."""
