"""A local GCS for tests: gcp-storage-emulator on 127.0.0.1, started in a subprocess.

The emulator answers downloads without ``x-goog-generation`` (real GCS sends it); tensorstore's GCS
driver reads the generation of every object it reads back, so orbax's OCDBT checkpoints fail on the
bare emulator ("Malformed StorageGeneration"). The server started here adds the header, as GCS does.

    with emulator() as env:      # {"STORAGE_EMULATOR_HOST": ..., "TENSORSTORE_GCS_HTTP_URL": ...}
      subprocess.run([...], env={**os.environ, **env})   # gs://distfair-test/... is a bucket
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

BUCKET = "distfair-test"

_SERVER = """
import sys
from gcp_storage_emulator.handlers import objects

_download = objects.download

def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except Exception:
    pass
  return _download(request, response, storage, *args, **kwargs)

objects.download = download  # before the server module builds its routing table
from gcp_storage_emulator.server import create_server
server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
server.start()
import time
while True:
  time.sleep(3600)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def emulator(bucket: str = BUCKET):
  """Yields the environment that points gcsfs, etils.epath and tensorstore at a fresh local GCS."""
  port = _free_port()
  # Its log goes to a file: the server writes a traceback for every connection a client drops,
  # and a pipe nobody reads would fill and block it.
  log = tempfile.TemporaryFile(mode="w+")
  proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), bucket],
                          stdout=subprocess.DEVNULL, stderr=log, text=True)
  try:
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        break
      except OSError:
        if proc.poll() is not None or time.time() > deadline:
          log.seek(0)
          raise RuntimeError(f"the GCS emulator did not start: {log.read()[-2000:]}")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_CLOUD_PROJECT": "distfair-test", "NO_GCE_CHECK": "True"}
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
