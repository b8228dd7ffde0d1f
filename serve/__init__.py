"""Serving (installed as easympt.serve): JAXServer, MPTJaxServer, JaxServerConfig."""

from easympt.serve.config import JaxServerConfig
from easympt.serve.mpt import MPTJaxServer
from easympt.serve.server import JAXServer

__all__ = ["JAXServer", "JaxServerConfig", "MPTJaxServer"]
