from __future__ import annotations

import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.krb5realm import KerberosLab

from .gss import gss_auth


@pytest.fixture
async def gss_gateway(krb5_realm: KerberosLab, make_gateway: GatewayFactory) -> RunningGateway:
    """An in-process gateway offering gssapi alone, every level allowed."""
    return await make_gateway(auth=gss_auth(krb5_realm))
