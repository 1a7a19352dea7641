"""One repository per entity; each runs its SQL on a Database (given, or the shared default)."""

from dash_storage.repositories.agents import AgentRepository
from dash_storage.repositories.budgets import BudgetRepository
from dash_storage.repositories.event_writer import EventWriter
from dash_storage.repositories.events import EventRepository
from dash_storage.repositories.sessions import SessionRepository
from dash_storage.repositories.swarms import SwarmRepository

__all__ = [
    "AgentRepository",
    "BudgetRepository",
    "EventRepository",
    "EventWriter",
    "SessionRepository",
    "SwarmRepository",
]
