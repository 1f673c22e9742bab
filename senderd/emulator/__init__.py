"""An embedded SAP BTP emulator for tests and `senderd demo`: XSUAA-like token server and CI runtime.

Never imported by the daemon's hot path.
"""

from senderd.emulator.pki import IssuedCert, Pki, PrivateKey, create_pki, create_root_ca
from senderd.emulator.runtime import AuthMode, FlowSpec, ReceivedMessage, Runtime, RuntimeStats, default_flows
from senderd.emulator.servicekey import client_id_for, service_key_dict
from senderd.emulator.token_server import RevokedTokenError, TokenServer, TokenServerFaults, TokenServerStats

__all__ = [
    "AuthMode",
    "FlowSpec",
    "IssuedCert",
    "Pki",
    "PrivateKey",
    "ReceivedMessage",
    "RevokedTokenError",
    "Runtime",
    "RuntimeStats",
    "TokenServer",
    "TokenServerFaults",
    "TokenServerStats",
    "client_id_for",
    "create_pki",
    "create_root_ca",
    "default_flows",
    "service_key_dict",
]
