"""The chat example's channels without the example's own history declaration, so that
bench/recovery.py turns history on and off with the broker's ``--history`` flag alone."""
from zchannels.chat.channels import socket

__all__ = ["socket"]
