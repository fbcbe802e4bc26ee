"""stop-vm without --turn-off through CIM: Msvm_ShutdownComponent.InitiateShutdown on a running
test guest, which powers off on `halt`; the job ends Completed (7), the VM Off (3). A VM that is
not running has no component, and a stale reference gets 32775."""

import pywbem

from common import change_state, cli_json, connect, define, guest_ready, initiate_shutdown
from common import shutdown_component

conn = connect()
vm = define(conn, "polite-cim")
assert not conn.AssociatorNames(vm, AssocClass="Msvm_SystemDevice"), "component while Off"

change_state(conn, vm, 2)
guest_ready("polite-cim")
component = shutdown_component(conn, vm)

job = initiate_shutdown(conn, vm, reason="pywbem test")

assert job["JobState"] == 7, f"job ended {job['JobState']}: {job['ErrorDescription']}"
assert int(conn.GetInstance(vm)["EnabledState"]) == 3
assert cli_json("get-vm", "polite-cim")[0]["enabled_state"] == 3
assert not conn.EnumerateInstanceNames("Msvm_ShutdownComponent"), "component after shutdown"
rv, _ = conn.InvokeMethod("InitiateShutdown", component, Force=True, Reason="again")
assert rv == 32775, f"InitiateShutdown on an Off VM returned {rv}"
print("shutdown ok")
