"""Virtual switches through CIM the way Hyper-V's scripts do it: DefineSystem on the switch
management service (internal: a port allocation whose HostResource is the host), a VM's
synthetic NIC and its connection through AddResourceSettings, the associations between them,
DestroySystem refused while a port is connected. Each step is checked through the CLI too."""

import pywbem

from common import cli, cli_json, connect, define, service

conn = connect()
vsms = service(conn)
switch_service = conn.EnumerateInstanceNames("Msvm_VirtualEthernetSwitchManagementService")[0]
host = [p for p in conn.EnumerateInstanceNames("Msvm_ComputerSystem")
        if "-" not in p["Name"]][0]

# An internal switch.
settings = pywbem.CIMInstance("Msvm_VirtualEthernetSwitchSettingData",
                              properties={"ElementName": "cim-switch"})
host_port = pywbem.CIMInstance(
    "Msvm_EthernetPortAllocationSettingData",
    properties={"ResourceType": pywbem.Uint16(33), "HostResource": [str(host)]},
)
rv, out = conn.InvokeMethod("DefineSystem", switch_service, SystemSettings=settings.tocimxmlstr(),
                            ResourceSettings=[host_port.tocimxmlstr()])
assert rv == 0, f"DefineSystem returned {rv}"
switch_path = out["ResultingSystem"]
switch = conn.GetInstance(switch_path)
assert switch["ElementName"] == "cim-switch", switch
assert cli_json("get-vmswitch", "cim-switch")[0]["switch_type"] == "Internal"
internal = [p for p in conn.EnumerateInstances("Msvm_InternalEthernetPort")
            if p["ElementName"] == "cim-switch"]
assert len(internal) == 1 and internal[0]["NetworkAddresses"], internal
hosted = conn.Associators(switch_path, AssocClass="Msvm_HostedEthernetPort")
assert [p.classname for p in hosted] == ["Msvm_InternalEthernetPort"], hosted

# A VM with a NIC (a static MAC in Hyper-V's form), then its connection to the switch.
vm = define(conn, "net-vm")
vssd = conn.Associators(vm, AssocClass="Msvm_SettingsDefineState",
                        ResultClass="Msvm_VirtualSystemSettingData")[0]
nic = pywbem.CIMInstance(
    "Msvm_SyntheticEthernetPortSettingData",
    properties={"ResourceType": pywbem.Uint16(10),
                "ResourceSubType": "Microsoft:Hyper-V:Synthetic Ethernet Port",
                "StaticMacAddress": True, "Address": "02155D0000AA"},
)
rv, out = conn.InvokeMethod("AddResourceSettings", vsms, AffectedConfiguration=vssd.path,
                            ResourceSettings=[nic.tocimxmlstr()])
assert rv == 0, f"AddResourceSettings(NIC) returned {rv}"
nic_path = out["ResultingResourceSettings"][0]
assert conn.GetInstance(nic_path)["Address"] == "02155D0000AA"
connection = pywbem.CIMInstance(
    "Msvm_EthernetPortAllocationSettingData",
    properties={"ResourceType": pywbem.Uint16(33), "Parent": str(nic_path),
                "HostResource": [str(switch_path)]},
)
rv, out = conn.InvokeMethod("AddResourceSettings", vsms, AffectedConfiguration=vssd.path,
                            ResourceSettings=[connection.tocimxmlstr()])
assert rv == 0, f"AddResourceSettings(connection) returned {rv}"
allocation = conn.GetInstance(out["ResultingResourceSettings"][0])
assert allocation["HostResource"][0].endswith(switch_path["Name"] + '"'), allocation["HostResource"]

adapter = cli_json("get-vmnetworkadapter", "net-vm")[0]
assert adapter["mac_address"] == "02:15:5d:00:00:aa", adapter
assert adapter["switch_name"] == "cim-switch", adapter
assert adapter["static_mac_address"] is True, adapter
assert len(adapter["ip_addresses"]) == 1, adapter
parts = {p.classname for p in conn.Associators(
    vssd.path, AssocClass="Msvm_VirtualEthernetSwitchSettingDataComponent")}
assert parts == {"Msvm_SyntheticEthernetPortSettingData",
                 "Msvm_EthernetPortAllocationSettingData"}, parts

# A switch with a connected port is not destroyed (32775); once disconnected it is.
rv, _ = conn.InvokeMethod("DestroySystem", switch_service, AffectedSystem=switch_path)
assert rv == 32775, f"DestroySystem of a switch in use returned {rv}"
cli("disconnect-vmnetworkadapter", "net-vm")
assert conn.EnumerateInstanceNames("Msvm_EthernetPortAllocationSettingData") == []
rv, _ = conn.InvokeMethod("DestroySystem", switch_service, AffectedSystem=switch_path)
assert rv == 0, f"DestroySystem returned {rv}"
assert cli_json("get-vmswitch") == []
print("network ok")
