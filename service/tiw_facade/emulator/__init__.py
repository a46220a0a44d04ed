"""An independent TIW server (API version 2019-09-19) over HTTP: the facade's test double.

It reuses nothing of the facade but ``tiw_facade.signing``, so a facade that got TIW wrong fails
against it the way it would fail against Tencent. Tencent's official Python SDK pointed at it
succeeds on all five actions; that is its proof. It owns the demo credentials (``DEMO_*``) that
`tiw-facade serve --emulator` hands to the facade.

    emulator = Emulator(EmulatorConfig(snapshot_seconds=0.1))
    url = await emulator.start()            # http://127.0.0.1:PORT
    emulator.add_fault(Fault(FaultKind.DROP, action="CreateSnapshotTask", count=1))
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DUPLICATE, count=1))
    ...
    await emulator.stop()
"""

from tiw_facade.emulator.admin import ADMIN_PREFIX
from tiw_facade.emulator.callbacks import CallbackFault, CallbackFaultKind, CallbackStats
from tiw_facade.emulator.config import (
    DEMO_CALLBACK_KEY,
    DEMO_CALLBACK_SDK_APP_IDS,
    DEMO_REGION,
    DEMO_SECRET_ID,
    DEMO_SECRET_KEY,
    EmulatorConfig,
)
from tiw_facade.emulator.protocol import REQUESTS, VERSION
from tiw_facade.emulator.server import Emulator
from tiw_facade.emulator.tasks import SEED_SDK_APP_ID
from tiw_facade.emulator.traffic import ActionStats, Fault, FaultKind, max_in_any_window

ACTIONS = tuple(REQUESTS)

__all__ = [
    "ACTIONS",
    "ADMIN_PREFIX",
    "DEMO_CALLBACK_KEY",
    "DEMO_CALLBACK_SDK_APP_IDS",
    "DEMO_REGION",
    "DEMO_SECRET_ID",
    "DEMO_SECRET_KEY",
    "SEED_SDK_APP_ID",
    "VERSION",
    "ActionStats",
    "CallbackFault",
    "CallbackFaultKind",
    "CallbackStats",
    "Emulator",
    "EmulatorConfig",
    "Fault",
    "FaultKind",
    "max_in_any_window",
]
