"""zchannels: Phoenix Channels for Python (command-line entry point)."""
