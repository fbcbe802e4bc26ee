"""Bad requests get the CIM error or Hyper-V return code a WMI client expects."""

import pywbem

from common import NS, connect, define, service

conn = connect()


def cim_error(status, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except pywbem.CIMError as e:
        assert e.status_code == status, f"{call.__name__}: {e.status_code} {e.status_description}, want {status}"
        return e
    raise AssertionError(f"{call.__name__} succeeded, want CIM error {status}")


cim_error(pywbem.CIM_ERR_INVALID_NAMESPACE, conn.EnumerateInstances, "Msvm_ComputerSystem", namespace="root/cimv2")
cim_error(pywbem.CIM_ERR_INVALID_CLASS, conn.EnumerateInstances, "Msvm_NoSuchClass")
cim_error(pywbem.CIM_ERR_NOT_FOUND, conn.GetClass, "Msvm_NoSuchClass")
missing = pywbem.CIMInstanceName(
    "Msvm_ComputerSystem",
    keybindings={"CreationClassName": "Msvm_ComputerSystem", "Name": "00000000-0000-0000-0000-000000000001"},
    namespace=NS,
)
cim_error(pywbem.CIM_ERR_NOT_FOUND, conn.GetInstance, missing)
cim_error(pywbem.CIM_ERR_NOT_FOUND, conn.InvokeMethod, "RequestStateChange", missing, RequestedState=pywbem.Uint16(2))

vm = define(conn, "errors-vm")
cim_error(pywbem.CIM_ERR_METHOD_NOT_FOUND, conn.InvokeMethod, "Explode", vm)
cim_error(pywbem.CIM_ERR_INVALID_PARAMETER, conn.InvokeMethod, "RequestStateChange", vm, RequestedState="two")
cim_error(pywbem.CIM_ERR_INVALID_PARAMETER, conn.InvokeMethod, "RequestStateChange", vm, NoSuchParameter=pywbem.Uint16(2))
cim_error(pywbem.CIM_ERR_INVALID_PARAMETER, conn.InvokeMethod, "RequestStateChange", vm, RequestedState=pywbem.Uint32(70000))

# A transition the state machine does not allow: Hyper-V's 32775, and nothing changes.
rv, out = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(9))
assert rv == 32775 and "Job" not in out, (rv, out)
assert conn.GetInstance(vm)["EnabledState"] == 3
rv, _ = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(4))
assert rv == 32770, f"shut down through RequestStateChange is not supported: {rv}"
rv, _ = conn.InvokeMethod("DefineSystem", service(conn), SystemSettings=pywbem.CIMInstance(
    "Msvm_VirtualSystemSettingData", properties={"ElementName": ""}).tocimxmlstr())
assert rv == 32773, f"an empty name is an invalid parameter: {rv}"

e = cim_error(pywbem.CIM_ERR_INVALID_QUERY, conn.ExecQuery, "WQL", "SELECT * FROM Msvm_ComputerSystem WHERE = 3")
assert "position 40" in e.status_description, e.status_description
cim_error(pywbem.CIM_ERR_INVALID_QUERY, conn.ExecQuery, "WQL", "SELECT Bogus FROM Msvm_ComputerSystem")
cim_error(pywbem.CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED, conn.ExecQuery, "DMTF:CQL", "SELECT * FROM Msvm_ComputerSystem")
cim_error(pywbem.CIM_ERR_NOT_SUPPORTED, conn.OpenEnumerateInstances, "Msvm_ComputerSystem")

# Pull operations refused, pywbem's Iter* fall back to the traditional operation.
assert len(list(conn.IterEnumerateInstances("Msvm_ComputerSystem"))) == 2
rv, _ = conn.InvokeMethod("DestroySystem", service(conn), AffectedSystem=vm)
assert rv == 0
print("errors ok")
