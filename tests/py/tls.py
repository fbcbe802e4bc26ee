"""HTTPS + Basic on a non-loopback bind: right credentials work, wrong ones get 401."""

import os

import pywbem

url = os.environ["CIM_URL"]
assert url.startswith("https://"), url
good = pywbem.WBEMConnection(
    url, creds=(os.environ["CIM_USER"], os.environ["CIM_PASSWORD"]),
    default_namespace="root/virtualization/v2", ca_certs=os.environ["CIM_CA"], timeout=30,
)
names = good.EnumerateInstanceNames("Msvm_ComputerSystem")
assert len(names) == 1, names

bad = pywbem.WBEMConnection(
    url, creds=(os.environ["CIM_USER"], "wrong"),
    default_namespace="root/virtualization/v2", ca_certs=os.environ["CIM_CA"], timeout=30,
)
try:
    bad.EnumerateInstanceNames("Msvm_ComputerSystem")
    raise AssertionError("wrong credentials were accepted")
except pywbem.AuthError:
    pass
except pywbem.HTTPError as e:
    assert e.status == 401, e
print("tls ok")
