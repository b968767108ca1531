import socket
import subprocess
import sys

import pytest


def test_outbound_connections_are_refused():
    s = socket.socket()
    with pytest.raises(OSError, match="network access blocked"):
        s.connect(("93.184.216.34", 80))
    s.close()


def test_subprocesses_are_guarded_too():
    code = "import socket; s = socket.socket(); s.connect(('1.1.1.1', 53))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "network access blocked" in r.stderr
