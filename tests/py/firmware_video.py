"""The firmware and video classes the way Hyper-V's scripts read them: a VM's Msvm_BIOSElement
through Msvm_SystemBIOS, its boot source through the VSSD's BootSourceOrder, and a running VM's
Msvm_SyntheticDisplayController (Msvm_SystemDevice) and Msvm_VideoHead
(Msvm_VideoHeadOnController) with the console framebuffer's resolution."""

import os
import time

from common import cli, cli_json, connect, guest_ready

conn = connect()
kernel = os.environ["KERNEL_FILE"]
width = int(os.environ["EXPECT_WIDTH"])
height = int(os.environ["EXPECT_HEIGHT"])


def system(name):
    guid = cli_json("get-vm", name)[0]["id"]
    return [p for p in conn.EnumerateInstanceNames("Msvm_ComputerSystem") if p["Name"] == guid][0]


def bios(vm):
    found = conn.Associators(vm, AssocClass="Msvm_SystemBIOS", ResultClass="Msvm_BIOSElement")
    assert len(found) == 1, found
    return found[0]


def boot_source(vm):
    vssd = conn.Associators(vm, AssocClass="Msvm_SettingsDefineState",
                            ResultClass="Msvm_VirtualSystemSettingData")[0]
    order = vssd["BootSourceOrder"]
    assert len(order) == 1, order
    parts = conn.AssociatorNames(vssd.path, AssocClass="Msvm_VirtualSystemSettingDataComponent",
                                 ResultClass="Msvm_BootSourceSettingData")
    assert len(parts) == 1 and str(parts[0]).endswith(order[0].split(".", 1)[1]), (parts, order)
    return conn.GetInstance(parts[0])


def displays(vm):
    return conn.Associators(vm, AssocClass="Msvm_SystemDevice",
                            ResultClass="Msvm_SyntheticDisplayController")


# A VM booting a Linux kernel: its firmware is the direct loader of that file.
cli("new-vm", "fw-kernel", "--memory-mib", "16", "--kernel", kernel, "--initrd", kernel,
    "--cmdline", "console=ttyS0 quiet")
vm = system("fw-kernel")
element = bios(vm)
assert element["TargetOperatingSystem"] == 36, element["TargetOperatingSystem"]
assert element["SoftwareElementState"] == 2, element["SoftwareElementState"]
assert element["SoftwareElementID"] == vm["Name"], element["SoftwareElementID"]
source = boot_source(vm)
assert source["BootSourceType"] == 3, source["BootSourceType"]
assert source["FirmwareDevicePath"] == kernel, source["FirmwareDevicePath"]
assert "console=ttyS0 quiet" in source["Description"], source["Description"]
assert displays(vm) == [], "a VM that is off has no display"

# A test-guest VM: its boot source is the guest embedded in the worker; running, it has a display.
cli("new-vm", "fw-guest", "--memory-mib", "16")
vm = system("fw-guest")
assert bios(vm)["TargetOperatingSystem"] == 1
source = boot_source(vm)
assert source["BootSourceType"] == 0 and source["FirmwareDevicePath"] is None, source
cli("start-vm", "fw-guest")
guest_ready("fw-guest")
assert bios(vm)["SoftwareElementState"] == 3, "the loader of a running VM runs"
controllers = displays(vm)
assert len(controllers) == 1, controllers
heads = conn.Associators(controllers[0].path, AssocClass="Msvm_VideoHeadOnController",
                         ResultClass="Msvm_VideoHead")
assert len(heads) == 1, heads
head = heads[0]
assert (head["CurrentHorizontalResolution"], head["CurrentVerticalResolution"]) == (width, height), \
    head
assert head["CurrentBitsPerPixel"] == 32 and head["CurrentNumberOfColumns"] == 80, head
assert head["DeviceID"].endswith("\\Head\\0"), head["DeviceID"]

# Stopped, the display is gone again.
cli("stop-vm", "fw-guest", "--turn-off")
deadline = time.time() + 60
while displays(vm):
    assert time.time() < deadline, "the display outlived the VM"
    time.sleep(0.2)
print("firmware video ok")
