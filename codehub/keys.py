"""Typed keys of the Application's state (aiohttp AppKey): what `app.py` provides."""

from __future__ import annotations

import aiodocker
import asyncpg
from aiohttp import web

from .config import Config
from .interfaces import HintBus, InstanceController, Leadership, ObjectStore, StorageProvider
from .store import Store

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
STORE = web.AppKey("store", Store)
HINTS = web.AppKey("hints", HintBus)
DOCKER = web.AppKey("docker", aiodocker.Docker)
OBJECTS = web.AppKey("objects", ObjectStore)
DATABASE_URL = web.AppKey("database_url", str)
INSTANCES = web.AppKey("instances", InstanceController)
STORAGE = web.AppKey("storage", StorageProvider)
ELECTOR = web.AppKey("elector", Leadership)
