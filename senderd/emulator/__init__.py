"""An embedded SAP BTP emulator for tests and `senderd demo`: XSUAA-like token servers and CI runtimes, one
tenant or several, with every key type SAP issues and the bindings the SAP BTP service operator writes.

Never imported by the daemon's hot path.
"""

from senderd.emulator.bindings import (
    LAYOUTS,
    Instance,
    Layout,
    binding_files,
    vcap_service,
    write_plain,
    write_projected,
)
from senderd.emulator.mpl import MplApi, MplApiFaults, MplApiStats, MplEntry, MplStatus, MplStore
from senderd.emulator.pki import IssuedCert, Pki, PrivateKey, create_pki, create_root_ca
from senderd.emulator.runtime import AuthMode, FlowSpec, ReceivedMessage, Runtime, RuntimeStats, default_flows
from senderd.emulator.servicekey import (
    KEY_TYPES,
    Credentials,
    KeyType,
    client_id_for,
    new_client_secret,
    service_key_dict,
)
from senderd.emulator.stack import EmulatorStack
from senderd.emulator.tenant import Binding, Tenant, TenantSpec
from senderd.emulator.token_server import RevokedTokenError, TokenServer, TokenServerFaults, TokenServerStats

__all__ = [
    "KEY_TYPES",
    "LAYOUTS",
    "AuthMode",
    "Binding",
    "Credentials",
    "EmulatorStack",
    "FlowSpec",
    "Instance",
    "IssuedCert",
    "KeyType",
    "Layout",
    "MplApi",
    "MplApiFaults",
    "MplApiStats",
    "MplEntry",
    "MplStatus",
    "MplStore",
    "Pki",
    "PrivateKey",
    "ReceivedMessage",
    "RevokedTokenError",
    "Runtime",
    "RuntimeStats",
    "Tenant",
    "TenantSpec",
    "TokenServer",
    "TokenServerFaults",
    "TokenServerStats",
    "binding_files",
    "client_id_for",
    "create_pki",
    "create_root_ca",
    "default_flows",
    "new_client_secret",
    "service_key_dict",
    "vcap_service",
    "write_plain",
    "write_projected",
]
