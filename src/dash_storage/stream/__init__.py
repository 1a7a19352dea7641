"""The event log as a live stream: followers, saved cursors and the Redis Streams relay."""

from dash_storage.stream.cursors import CursorLag, list_cursors, load_cursor, save_cursor
from dash_storage.stream.follow import Follower, Page
from dash_storage.stream.relay import Relay, RelayError, RelayStats

__all__ = [
    "CursorLag",
    "Follower",
    "Page",
    "Relay",
    "RelayError",
    "RelayStats",
    "list_cursors",
    "load_cursor",
    "save_cursor",
]
