"""`userstream demo` (what `make demo` runs) on the embedded default: no DATABASE_URL, no
REDIS_URL. The `curl -N` command it prints shows live `change` frames (issue 2, point 6)."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.services import free_port


def test_printed_curl_command_streams_live_changes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env |= {"USERSTREAM_DATA_DIR": str(tmp_path / "data"), "USERSTREAM_LOG_LEVEL": "warning"}
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--port", str(port), "--rate", "5"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        commands = []
        live = ""
        for line in demo.stdout:  # ends if the demo dies, which fails the assertion below
            if "demo is live" in line:
                live = line
            if line.strip().startswith("curl -N"):
                commands.append(shlex.split(line.strip()))
                if len(commands) == 2:
                    break
        assert len(commands) == 2, "the demo did not print two curl commands"
        assert "(wal ingest)" in live, live  # the embedded Postgres has logical decoding
        started = time.monotonic()
        curl = subprocess.run(
            [*commands[0], "--max-time", "4", "--silent"], capture_output=True, text=True
        )
        elapsed = time.monotonic() - started
        assert curl.returncode == 28, curl.stderr  # 28: --max-time reached while streaming
        assert "event: offset" in curl.stdout
        assert "event: change" in curl.stdout, curl.stdout
        print(f"curl streamed {curl.stdout.count('event: change')} changes in {elapsed:.1f} s")
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=20)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()
    assert demo.returncode == 0
