"""The loopback endpoint applies the daemon socket's policy to the user owning the client socket.

Runs as root (so the venv under /root is readable), makes one request as root, then drops to
uid/gid 65534 (nobody/nogroup) and makes a new connection: its socket is owned by 65534 and the
daemon must refuse it with 403 and a CIMError header, unless EXPECT=admitted (65534 is then in
the daemon's --socket-group).
"""

import os

import pywbem

from common import connect

as_root = connect()
assert as_root.EnumerateInstanceNames("Msvm_ComputerSystem"), "root sees no host system"

os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert os.geteuid() == 65534

as_nobody = connect()
if os.environ.get("EXPECT") == "admitted":
    assert as_nobody.EnumerateInstanceNames("Msvm_ComputerSystem"), "socket group member refused"
    print("access ok: 65534 admitted")
else:
    try:
        as_nobody.EnumerateInstanceNames("Msvm_ComputerSystem")
    except pywbem.HTTPError as error:
        assert error.status == 403, f"status {error.status}"
        assert error.cimerror, "403 without a CIMError header"
        print(f"access ok: 65534 refused ({error.status}, {error.cimerror})")
    else:
        raise AssertionError("uid 65534 was served")
