"""Every CLI verb and its CIM method equivalent, walked on one VM: each verb's effect is checked
through CIM, and each method's effect through the CLI."""

import os
import tempfile

import pywbem

from common import change_state, cli, cli_json, connect, define, guest_ready, initiate_shutdown
from common import service, wait_job

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
    "checkpoint-vm": "Msvm_VirtualSystemSnapshotService.CreateSnapshot",
    "get-vm-checkpoint": "Associators Msvm_SnapshotOfVirtualSystem / Msvm_MostCurrentSnapshotInBranch",
    "restore-vm-checkpoint": "Msvm_VirtualSystemSnapshotService.ApplySnapshot",
    "remove-vm-checkpoint": "Msvm_VirtualSystemSnapshotService.DestroySnapshot",
    "remove-vm-checkpoint --include-children": "Msvm_VirtualSystemSnapshotService.DestroySnapshotTree",
    "rename-vm-checkpoint": "Msvm_VirtualSystemManagementService.ModifySystemSettings (a checkpoint's ElementName)",
    "export-vm": "Msvm_VirtualSystemManagementService.ExportSystemDefinition",
    "import-vm": "Msvm_VirtualSystemManagementService.ImportSystemDefinition",
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

# Checkpoints: the CLI acts, CIM observes; then CIM acts, the CLI observes.
snapshots = conn.EnumerateInstanceNames("Msvm_VirtualSystemSnapshotService")[0]
cli("checkpoint-vm", "verbs-cim", "--name", "by-cli")
listed = conn.Associators(vm, AssocClass="Msvm_SnapshotOfVirtualSystem")
assert [s["ElementName"] for s in listed] == ["by-cli"], listed
by_cli = listed[0]
renamed = by_cli.copy()
renamed["ElementName"] = "renamed"
rv, _ = conn.InvokeMethod("ModifySystemSettings", service(conn), SystemSettings=renamed.tocimxmlstr())
assert rv == 0, f"rename returned {rv}"
cli("rename-vm-checkpoint", "verbs-cim", "renamed", "by-cli-again")
assert [s["ElementName"] for s in conn.Associators(vm, AssocClass="Msvm_SnapshotOfVirtualSystem")] == ["by-cli-again"]
rv, out = conn.InvokeMethod("CreateSnapshot", snapshots, AffectedSystem=vm)
assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
assert len(cli_json("get-vm-checkpoint", "verbs-cim")["checkpoints"]) == 2
rv, out = conn.InvokeMethod("ApplySnapshot", snapshots, Snapshot=by_cli.path)
assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
tree = cli_json("get-vm-checkpoint", "verbs-cim")
assert tree["now"].upper() in by_cli["InstanceID"], tree
cli("restore-vm-checkpoint", "verbs-cim", "by-cli-again")
current = conn.Associators(vm, AssocClass="Msvm_MostCurrentSnapshotInBranch")
assert [c["ElementName"] for c in current] == ["by-cli-again"], current
cli("remove-vm-checkpoint", "verbs-cim", "by-cli-again", "--include-children")
assert conn.Associators(vm, AssocClass="Msvm_SnapshotOfVirtualSystem") == []
cli("checkpoint-vm", "verbs-cim", "--name", "one")
one = conn.Associators(vm, AssocClass="Msvm_SnapshotOfVirtualSystem")[0]
rv, out = conn.InvokeMethod("DestroySnapshot", snapshots, AffectedSnapshot=one.path)
assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
assert cli_json("get-vm-checkpoint", "verbs-cim")["checkpoints"] == []

# Export and import: through CIM, checked by the CLI, and back.
export_root = tempfile.mkdtemp()
rv, out = conn.InvokeMethod("ExportSystemDefinition", service(conn), ComputerSystem=vm, ExportDirectory=export_root)
assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7, rv
exported = os.path.join(export_root, "verbs-cim")
assert os.path.isfile(os.path.join(exported, "config.json"))
rv, out = conn.InvokeMethod("ImportSystemDefinition", service(conn), SystemDefinitionFile=exported,
                            GenerateNewSystemIdentifier=True)
assert rv == 0, f"import returned {rv}"
imported = out["ImportedSystem"]["InstanceID"]
assert len([v for v in cli_json("get-vm") if v["name"] == "verbs-cim"]) == 2
copy = [v for v in cli_json("get-vm") if v["name"] == "verbs-cim" and v["id"] not in vm["Name"]][0]
cli("export-vm", copy["id"], "--to", os.path.join(export_root, "by-cli"))
assert imported.upper().endswith(copy["id"].upper()), (imported, copy["id"])
rv, _ = conn.InvokeMethod("DestroySystem", service(conn), AffectedSystem=vm)
assert rv == 0
cli("import-vm", os.path.join(export_root, "by-cli"), "--copy")
cli("remove-vm", copy["id"])
assert cli("get-vm", "verbs-cim", check=False).returncode == 0, "the CLI import is there"
for v in [v for v in cli_json("get-vm") if v["name"] == "verbs-cim"]:
    cli("remove-vm", v["id"])
assert cli("get-vm", "verbs-cim", check=False).returncode != 0
print("verbs ok:", ", ".join(EQUIVALENTS))
