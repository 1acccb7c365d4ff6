"""agent.kube defers the libraries kubernetes-asyncio imports for code paths the agent never takes.

urllib3, dateutil's parser and multiprocessing's ThreadPool cost ~2 MiB of the daemon's RSS at
start; they must stay unloaded after ``import agent.daemon`` and still work, unchanged, for any
code that does use them (including kubernetes-asyncio's own ``from x import y`` names).
Fresh interpreters, since the test process itself may have imported them already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         timeout=120)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_daemon_import_leaves_them_unloaded() -> None:
    result = _run(
        "import json, sys\n"
        "import agent.daemon\n"
        "loaded = [m for m in ('urllib3.poolmanager', 'dateutil.parser._parser', 'dateutil.tz') if m in sys.modules]\n"
        "print(json.dumps({'loaded': loaded, 'pool': 'Pool' in vars(sys.modules['multiprocessing.pool'])}))"
    )
    assert result == {"loaded": [], "pool": False}


def test_deferred_modules_work_when_used() -> None:
    result = _run(
        "import asyncio, json\n"
        "import agent.daemon\n"
        "from kubernetes_asyncio.client import api_client, configuration\n"
        "parsed = api_client.parse('2024-01-02T03:04:05Z').isoformat()\n"
        "c = configuration.Configuration(); c.username, c.password = 'u', 'p'\n"
        "auth = c.get_basic_auth_token()\n"
        "async def pooled():\n"
        "    client = api_client.ApiClient()\n"
        "    try:\n"
        "        return client.pool.apply(lambda: 42)\n"
        "    finally:\n"
        "        client.pool.close(); await client.close()\n"
        "answer = asyncio.run(pooled())\n"
        "import urllib3, dateutil.parser\n"
        "from multiprocessing.pool import ThreadPool, Pool\n"
        "print(json.dumps({'parsed': parsed, 'auth': auth, 'answer': answer,\n"
        "                  'urllib3': isinstance(urllib3.PoolManager, type),\n"
        "                  'iso': dateutil.parser.isoparse('2024-01-02').year, 'pool': Pool.__name__}))"
    )
    assert result == {
        "parsed": "2024-01-02T03:04:05+00:00", "auth": "Basic dTpw", "answer": 42, "urllib3": True, "iso": 2024,
        "pool": "Pool",
    }
