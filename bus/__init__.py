"""The internal bus, shared by the broker, the edges and the workers: its wire format
(``wire``), ZeroMQ sockets on an asyncio loop (``loopsock``), CURVE keys and
authentication (``curve``), the processes' log set-up (``logsetup``) and the one-line
start-up error every process reports its mistakes with (``startup``)."""
