"""zchannels: Phoenix Channels for Python (command-line entry point and the publisher client)."""
from zchannels.publisher import AsyncPublisher, PublishError, Publisher

__all__ = ["Publisher", "AsyncPublisher", "PublishError"]
