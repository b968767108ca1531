"""Loaded by every Python process the tests start (PYTHONPATH): refuses network connections that
leave the machine, so a test that passes proves the code under test never touches the network.
Loopback and Unix sockets stay allowed (papermill talks to its kernel over localhost)."""
import ipaddress
import socket

_connect = socket.socket.connect


def _guarded(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host in ("localhost",)
        if not ok:
            raise OSError(f"network access blocked by the test suite: {address}")
    return _connect(self, address)


socket.socket.connect = _guarded
