"""A real GCS-compatible server on 127.0.0.1 for the ``gs://`` tests: gcp-storage-emulator (Google Cloud Storage's
JSON API, objects held in memory) in a subprocess.

Nothing here patches a client: carat talks HTTP to this socket through gcsfs exactly as it would to Google
(``STORAGE_EMULATOR_HOST``, the variable Google's own client libraries read).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Iterator

from tests.ports import free_port, wait_for_port


@contextlib.contextmanager
def gcs_emulator_server(directory: str) -> Iterator[str]:
    """``python -m gcp_storage_emulator start --in-memory`` on a free port of 127.0.0.1; yields its endpoint URL.
    It runs in ``directory``, where it would keep its objects on disk without ``--in-memory``."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=directory)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
