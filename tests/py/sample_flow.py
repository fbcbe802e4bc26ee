"""Microsoft's sample flow through pywbem: DefineSystem with an embedded VSSD, start, poll the job,
enumerate, query, associators, CreateSnapshot of the running VM found by ExecQuery and ASSOCIATORS
OF, stop, more checkpoint methods (apply, destroy the tree), destroy."""

import pywbem

from common import NS, change_state, connect, define, service, wait_job

conn = connect()

vm = define(conn, "flow-vm", mib=16)
assert conn.GetInstance(vm)["EnabledState"] == 3, "a new VM is Off"

rv, out = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(2))
assert rv == 4096, f"start returned {rv}"
job = wait_job(conn, out["Job"])
assert job["JobState"] == 7 and job["ErrorCode"] == 0 and job["PercentComplete"] == 100, job

running = [i for i in conn.EnumerateInstances("Msvm_ComputerSystem") if i["Name"] == vm["Name"]]
assert len(running) == 1
assert running[0]["EnabledState"] == 2, running[0]["EnabledState"]
assert running[0]["ProcessID"] and running[0]["ProcessID"] > 0, "the worker's pid is shown"
assert running[0]["Caption"] == "Virtual Machine"
assert len(str(running[0]["TimeOfLastStateChange"])) == 25

found = conn.ExecQuery(
    "WQL", "SELECT Name, EnabledState FROM Msvm_ComputerSystem WHERE ElementName = 'FLOW-VM' AND EnabledState = 2"
)
assert [i["Name"] for i in found] == [vm["Name"]], found
assert set(found[0].keys()) == {"Name", "EnabledState"}, found[0].keys()

path = f"Msvm_ComputerSystem.CreationClassName='Msvm_ComputerSystem',Name='{vm['Name']}'"
settings = conn.ExecQuery(
    "WQL",
    "ASSOCIATORS OF {%s} WHERE AssocClass = Msvm_SettingsDefineState ResultClass = Msvm_VirtualSystemSettingData" % path,
)
assert len(settings) == 1 and settings[0]["ElementName"] == "flow-vm", settings
assert settings[0]["VirtualSystemType"] == "Microsoft:Hyper-V:System:Realized"
resources = conn.Associators(
    settings[0].path, AssocClass="Msvm_VirtualSystemSettingDataComponent", ResultClass="Msvm_MemorySettingData"
)
assert [r["VirtualQuantity"] for r in resources] == [16], resources
jobs = conn.References(vm, ResultClass="Msvm_AffectedJobElement")
assert any(j["AffectingElement"]["InstanceID"] == job["InstanceID"] for j in jobs), jobs

snapshots = conn.EnumerateInstanceNames("Msvm_VirtualSystemSnapshotService")[0]


def create_snapshot():
    rv, out = conn.InvokeMethod("CreateSnapshot", snapshots, AffectedSystem=vm, SnapshotType=pywbem.Uint16(2))
    assert rv == 4096, f"CreateSnapshot returned {rv}"
    job = wait_job(conn, out["Job"])
    assert job["JobState"] == 7, job
    current = conn.Associators(vm, AssocClass="Msvm_MostCurrentSnapshotInBranch")
    assert len(current) == 1, current
    assert current[0]["VirtualSystemType"] == "Microsoft:Hyper-V:Snapshot:Realized", current[0]
    assert current[0]["ElementName"].startswith("flow-vm ("), current[0]["ElementName"]
    return current[0]


# The sample's CreateSnapshot: on the running VM, found again by ExecQuery and ASSOCIATORS OF.
first = create_snapshot()
assert conn.GetInstance(vm)["EnabledState"] == 2, "the VM kept running"
found = conn.ExecQuery(
    "WQL",
    "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Realized'",
)
assert [f["InstanceID"] for f in found] == [first["InstanceID"]], found
assert first["IsSaved"] is True, "a running VM's standard checkpoint holds its memory"
of_vm = conn.ExecQuery(
    "WQL", "ASSOCIATORS OF {%s} WHERE AssocClass = Msvm_SnapshotOfVirtualSystem" % path
)
assert [s["InstanceID"] for s in of_vm] == [first["InstanceID"]], of_vm

change_state(conn, vm, 3)
assert conn.GetInstance(vm)["EnabledState"] == 3
assert conn.GetInstance(vm).get("ProcessID") is None

second = create_snapshot()
assert second["Parent"] is not None and first["InstanceID"] in second["Parent"], second["Parent"]
listed = conn.Associators(vm, AssocClass="Msvm_SnapshotOfVirtualSystem")
assert sorted(s["InstanceID"] for s in listed) == sorted([first["InstanceID"], second["InstanceID"]]), listed
parents = conn.Associators(second.path, AssocClass="Msvm_ParentChildSettingData", ResultRole="Antecedent")
assert [p["InstanceID"] for p in parents] == [first["InstanceID"]], parents

rv, out = conn.InvokeMethod("ApplySnapshot", snapshots, Snapshot=first.path)
assert rv == 4096, f"ApplySnapshot returned {rv}"
assert wait_job(conn, out["Job"])["JobState"] == 7
assert conn.GetInstance(vm)["EnabledState"] == 6, "applying a running VM's checkpoint leaves it Saved"
current = conn.Associators(vm, AssocClass="Msvm_MostCurrentSnapshotInBranch")
assert [c["InstanceID"] for c in current] == [first["InstanceID"]], current

rv, out = conn.InvokeMethod("DestroySnapshotTree", snapshots, SnapshotSettingData=first.path)
assert rv == 4096, f"DestroySnapshotTree returned {rv}"
assert wait_job(conn, out["Job"])["JobState"] == 7
assert conn.Associators(vm, AssocClass="Msvm_SnapshotOfVirtualSystem") == []
change_state(conn, vm, 3)  # Saved → Off discards the saved state
assert conn.GetInstance(vm)["EnabledState"] == 3

rv, _ = conn.InvokeMethod("DestroySystem", service(conn), AffectedSystem=vm)
assert rv == 0, f"DestroySystem returned {rv}"
try:
    conn.GetInstance(vm)
    raise AssertionError("the destroyed VM is still there")
except pywbem.CIMError as e:
    assert e.status_code == pywbem.CIM_ERR_NOT_FOUND, e
print("sample flow ok")
