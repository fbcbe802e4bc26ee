"""A pywbem WBEMListener subscribed (filter + destination + subscription) receives the state
changes of a VM started and stopped through the CLI, and the creation and deletion of one of its
checkpoints."""

import os
import queue
import socket
import time

import pywbem

from common import INTEROP, cli, cli_json, connect

received = queue.Queue()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


port = free_port()
listener = pywbem.WBEMListener("127.0.0.1", http_port=port)
listener.add_callback(lambda indication, host: received.put(indication))
listener.start()

conn = connect()
query = "SELECT * FROM CIM_InstModification WHERE SourceInstance ISA Msvm_ComputerSystem"
filter_path = conn.CreateInstance(
    pywbem.CIMInstance(
        "CIM_IndicationFilter",
        properties={"Name": "vm-states", "Query": query, "QueryLanguage": "WQL", "SourceNamespace": "root/virtualization/v2"},
    ),
    namespace=INTEROP,
)
destination = conn.CreateInstance(
    pywbem.CIMInstance(
        "CIM_ListenerDestinationCIMXML",
        properties={"Name": "test-listener", "Destination": f"http://127.0.0.1:{port}"},
    ),
    namespace=INTEROP,
)
subscription = conn.CreateInstance(
    pywbem.CIMInstance("CIM_IndicationSubscription", properties={"Filter": filter_path, "Handler": destination}),
    namespace=INTEROP,
)
assert len(conn.EnumerateInstances("CIM_IndicationSubscription", namespace=INTEROP)) == 1

cli("new-vm", "ind-vm", "--memory-mib", "16")
vm_id = cli_json("get-vm", "ind-vm")[0]["id"]
cli("start-vm", "ind-vm")
cli("stop-vm", "ind-vm", "--turn-off")

pairs = []
deadline = time.time() + 30
while time.time() < deadline and (32774, 3) not in pairs:
    try:
        indication = received.get(timeout=1)
    except queue.Empty:
        continue
    assert indication.classname == "CIM_InstModification", indication.classname
    source = indication["SourceInstance"]
    if source.classname != "Msvm_ComputerSystem" or source["Name"] != vm_id:
        continue
    pairs.append((int(indication["PreviousInstance"]["EnabledState"]), int(source["EnabledState"])))

assert (3, 32770) in pairs and (32770, 2) in pairs, pairs
assert (2, 32774) in pairs and (32774, 3) in pairs, pairs

# Checkpoint changes: a creation and a deletion of a snapshot's settings.
checkpoint_filter = conn.CreateInstance(
    pywbem.CIMInstance(
        "CIM_IndicationFilter",
        properties={
            "Name": "checkpoints",
            "Query": "SELECT * FROM CIM_InstCreation WHERE SourceInstance ISA Msvm_VirtualSystemSettingData",
            "QueryLanguage": "WQL",
            "SourceNamespace": "root/virtualization/v2",
        },
    ),
    namespace=INTEROP,
)
deleted_filter = conn.CreateInstance(
    pywbem.CIMInstance(
        "CIM_IndicationFilter",
        properties={
            "Name": "checkpoints-gone",
            "Query": "SELECT * FROM CIM_InstDeletion WHERE SourceInstance ISA Msvm_VirtualSystemSettingData",
            "QueryLanguage": "WQL",
            "SourceNamespace": "root/virtualization/v2",
        },
    ),
    namespace=INTEROP,
)
checkpoint_subscriptions = [
    conn.CreateInstance(
        pywbem.CIMInstance("CIM_IndicationSubscription", properties={"Filter": f, "Handler": destination}),
        namespace=INTEROP,
    )
    for f in (checkpoint_filter, deleted_filter)
]
cli("checkpoint-vm", "ind-vm", "--name", "watched")
cp_id = cli_json("get-vm-checkpoint", "ind-vm")["checkpoints"][0]["id"].upper()
cli("remove-vm-checkpoint", "ind-vm", "watched")
seen = set()
deadline = time.time() + 30
while time.time() < deadline and len(seen) < 2:
    try:
        indication = received.get(timeout=1)
    except queue.Empty:
        continue
    source = indication["SourceInstance"]
    if source.classname == "Msvm_VirtualSystemSettingData" and source["InstanceID"] == f"Microsoft:{cp_id}":
        seen.add(indication.classname)
assert seen == {"CIM_InstCreation", "CIM_InstDeletion"}, seen

for s in checkpoint_subscriptions + [subscription]:
    conn.DeleteInstance(s)
assert conn.EnumerateInstances("CIM_IndicationSubscription", namespace=INTEROP) == []
listener.stop()
cli("remove-vm", "ind-vm")
print("indications ok:", pairs)
