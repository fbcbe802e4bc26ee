"""Shared helpers of the CIM-XML tests: connection, job polling, the CLI."""

import json
import os
import subprocess
import time

import pywbem

NS = "root/virtualization/v2"
INTEROP = "root/interop"
TERMINAL = (7, 8, 9, 10, 32768)


def connect(**kwargs):
    return pywbem.WBEMConnection(os.environ["CIM_URL"], default_namespace=NS, timeout=60, **kwargs)


def service(conn):
    return conn.EnumerateInstanceNames("Msvm_VirtualSystemManagementService")[0]


def wait_job(conn, job, timeout=60):
    """Microsoft's sample loop: GetInstance(Job) until JobState is not 3/4."""
    deadline = time.time() + timeout
    while True:
        instance = conn.GetInstance(job)
        if instance["JobState"] in TERMINAL:
            return instance
        assert time.time() < deadline, f"job {job} still {instance['JobState']}"
        time.sleep(0.05)


def change_state(conn, vm, state):
    rv, out = conn.InvokeMethod("RequestStateChange", vm, RequestedState=pywbem.Uint16(state))
    if rv == 4096:
        job = wait_job(conn, out["Job"])
        assert job["JobState"] == 7, f"job ended {job['JobState']}: {job['ErrorDescription']}"
    else:
        assert rv == 0, f"RequestStateChange({state}) returned {rv}"


def vssd(name):
    return pywbem.CIMInstance(
        "Msvm_VirtualSystemSettingData", properties={"ElementName": name}
    ).tocimxmlstr()


def memory(mib):
    return pywbem.CIMInstance(
        "Msvm_MemorySettingData",
        properties={"ResourceType": pywbem.Uint16(4), "VirtualQuantity": pywbem.Uint64(mib)},
    ).tocimxmlstr()


def define(conn, name, mib=16):
    rv, out = conn.InvokeMethod(
        "DefineSystem", service(conn), SystemSettings=vssd(name), ResourceSettings=[memory(mib)]
    )
    assert rv == 0, f"DefineSystem returned {rv}"
    return out["ResultingSystem"]


def cli(*args, check=True):
    """Runs the vmms CLI; the store comes from VMMS_STORE (no --store)."""
    result = subprocess.run(
        [os.environ["VMMS_BIN"], *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, f"vmms {args}: {result.stderr}"
    return result


def cli_json(*args):
    return json.loads(cli(*args, "--output", "json").stdout)


def guest_ready(name, timeout=120):
    """Waits until the test guest of VM `name` counts (it then answers `halt` on its console)."""
    deadline = time.time() + timeout
    while True:
        worker = cli_json("get-vm", name)[0].get("worker") or {}
        if ((worker.get("test_guest") or {}).get("counter") or 0) > 0:
            return
        assert time.time() < deadline, f"the test guest of {name} never counted"
        time.sleep(0.2)


def shutdown_component(conn, vm):
    """The Msvm_ShutdownComponent of `vm`, through Msvm_SystemDevice as Hyper-V's samples do."""
    parts = conn.AssociatorNames(
        vm, AssocClass="Msvm_SystemDevice", ResultClass="Msvm_ShutdownComponent"
    )
    assert len(parts) == 1, f"{len(parts)} shutdown components"
    return parts[0]


def initiate_shutdown(conn, vm, reason="test"):
    """InitiateShutdown on `vm`'s shutdown component; returns the finished job."""
    rv, out = conn.InvokeMethod(
        "InitiateShutdown", shutdown_component(conn, vm), Force=False, Reason=reason
    )
    assert rv == 4096, f"InitiateShutdown returned {rv}"
    return wait_job(conn, out["Job"])
