"""ModifySystemSettings, ModifyResourceSettings, AddResourceSettings and GetSummaryInformation:
each change is seen through CIM and through the CLI, and ClassDefsOnly / KeysOnly queries work."""

import os
import tempfile

import pywbem

from common import cli_json, connect, define, service

conn = connect()
svc = service(conn)
vm = define(conn, "settings-vm", mib=16)
path = f"Msvm_ComputerSystem.CreationClassName='Msvm_ComputerSystem',Name='{vm['Name']}'"
vssd = conn.Associators(vm, AssocClass="Msvm_SettingsDefineState", ResultClass="Msvm_VirtualSystemSettingData")[0]

# Rename and change the recovery action through an embedded VSSD that names the VM by InstanceID.
changed = pywbem.CIMInstance(
    "Msvm_VirtualSystemSettingData",
    properties={"InstanceID": vssd["InstanceID"], "ElementName": "renamed-vm",
                "AutomaticRecoveryAction": pywbem.Uint16(2)},
)
rv, _ = conn.InvokeMethod("ModifySystemSettings", svc, SystemSettings=changed.tocimxmlstr())
assert rv == 0, rv
view = cli_json("get-vm", "renamed-vm")[0]
assert view["config"]["automatic_recovery_action"] == "None", view["config"]

# Two processors and 32 MiB through the RASDs the VM already has.
processor = conn.Associators(vssd.path, ResultClass="Msvm_ProcessorSettingData")[0]
processor["VirtualQuantity"] = pywbem.Uint64(2)
memory = conn.Associators(vssd.path, ResultClass="Msvm_MemorySettingData")[0]
memory["VirtualQuantity"] = pywbem.Uint64(32)
rv, out = conn.InvokeMethod(
    "ModifyResourceSettings", svc, ResourceSettings=[processor.tocimxmlstr(), memory.tocimxmlstr()]
)
assert rv == 0, rv
assert len(out["ResultingResourceSettings"]) == 2, out
config = cli_json("get-vm", "renamed-vm")[0]["config"]
assert (config["vcpus"], config["memory_mib"]) == (2, 32), config

# A disk image added as Msvm_StorageAllocationSettingData.
image = os.path.join(tempfile.mkdtemp(), "data.img")
with open(image, "wb") as f:
    f.truncate(1 << 20)
disk = pywbem.CIMInstance(
    "Msvm_StorageAllocationSettingData",
    properties={"ResourceType": pywbem.Uint16(31), "HostResource": [image]},
)
rv, out = conn.InvokeMethod("AddResourceSettings", svc, AffectedConfiguration=vssd.path,
                            ResourceSettings=[disk.tocimxmlstr()])
assert rv == 0, rv
added = conn.GetInstance(out["ResultingResourceSettings"][0])
assert added["HostResource"] == [image], added["HostResource"]
assert cli_json("get-vm", "renamed-vm")[0]["config"]["disks"][0]["path"] == image

rv, out = conn.InvokeMethod("GetSummaryInformation", svc, SettingData=[vssd.path],
                            RequestedInformation=[pywbem.Uint32(1), pywbem.Uint32(4), pywbem.Uint32(100)])
assert rv == 0, rv
summary = out["SummaryInformation"][0]
assert (summary["ElementName"], summary["NumberOfProcessors"], summary["EnabledState"]) == ("renamed-vm", 2, 3), summary

keys = conn.ExecQuery("WQL", "REFERENCES OF {%s} WHERE ResultClass = Msvm_SettingsDefineState KeysOnly" % path)
assert len(keys) == 1 and set(keys[0].keys()) == {"ManagedElement", "SettingData"}, keys

rv, _ = conn.InvokeMethod("DestroySystem", svc, AffectedSystem=vm)
assert rv == 0
print("settings ok")
