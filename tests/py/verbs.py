"""Every CLI verb and its CIM method equivalent, walked on one VM: each verb's effect is checked
through CIM, and each method's effect through the CLI."""

import pywbem

from common import change_state, cli, cli_json, connect, define, guest_ready, initiate_shutdown
from common import service

conn = connect()

# CLI verb → CIM equivalent (None: Hyper-V has no WMI method for it either, or not yet here).
EQUIVALENTS = {
    "new-vm": "Msvm_VirtualSystemManagementService.DefineSystem",
    "get-vm": "EnumerateInstances/GetInstance Msvm_ComputerSystem",
    "start-vm": "Msvm_ComputerSystem.RequestStateChange(2)",
    "stop-vm": "Msvm_ShutdownComponent.InitiateShutdown",
    "stop-vm --turn-off": "Msvm_ComputerSystem.RequestStateChange(3)",
    "suspend-vm": "Msvm_ComputerSystem.RequestStateChange(9)",
    "resume-vm": "Msvm_ComputerSystem.RequestStateChange(2)",
    "save-vm": "Msvm_ComputerSystem.RequestStateChange(6)",
    "restart-vm": "Msvm_ComputerSystem.RequestStateChange(11)",
    "remove-vm": "Msvm_VirtualSystemManagementService.DestroySystem",
    "get-vm-event": "CIM_IndicationSubscription (indications)",
}


def state(vm):
    return int(conn.GetInstance(vm)["EnabledState"])


# The CLI acts, CIM observes.
cli("new-vm", "verbs-cli", "--memory-mib", "16")
cli_vm = [n for n in conn.EnumerateInstanceNames("Msvm_ComputerSystem")
          if n["Name"] == cli_json("get-vm", "verbs-cli")[0]["id"]][0]
for verb, expected in [("start-vm", 2), ("suspend-vm", 9), ("resume-vm", 2), ("restart-vm", 2),
                       ("save-vm", 6), ("start-vm", 2)]:
    cli(verb, "verbs-cli")
    assert state(cli_vm) == expected, (verb, state(cli_vm))
cli("stop-vm", "verbs-cli", "--turn-off")
assert state(cli_vm) == 3
cli("start-vm", "verbs-cli")
guest_ready("verbs-cli")
cli("stop-vm", "verbs-cli")
assert state(cli_vm) == 3
cli("remove-vm", "verbs-cli")
assert all(n["Name"] != cli_vm["Name"] for n in conn.EnumerateInstanceNames("Msvm_ComputerSystem"))

# CIM acts, the CLI observes.
vm = define(conn, "verbs-cim")
assert cli_json("get-vm", "verbs-cim")[0]["enabled_state"] == 3
for requested, expected in [(2, 2), (9, 9), (2, 2), (11, 2), (6, 6), (2, 2), (3, 3)]:
    change_state(conn, vm, requested)
    assert cli_json("get-vm", "verbs-cim")[0]["enabled_state"] == expected, (requested, expected)
change_state(conn, vm, 2)
guest_ready("verbs-cim")
job = initiate_shutdown(conn, vm)
assert job["JobState"] == 7, f"InitiateShutdown job ended {job['JobState']}"
assert cli_json("get-vm", "verbs-cim")[0]["enabled_state"] == 3
events = cli_json("get-vm-event", "verbs-cim")
assert any("StateChanged" in e["kind"] for e in events), events
rv, _ = conn.InvokeMethod("DestroySystem", service(conn), AffectedSystem=vm)
assert rv == 0
assert cli("get-vm", "verbs-cim", check=False).returncode != 0
print("verbs ok:", ", ".join(EQUIVALENTS))
