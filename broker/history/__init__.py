"""Broadcast history for message recovery: the store interface and its implementations
(memory, Redis Streams), read and written by the broker's sequencer."""
