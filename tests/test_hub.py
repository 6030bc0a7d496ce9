"""push_to_hub and from_pretrained end to end against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "hub_client.py")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_push_and_load_back_by_repo_id(report):
    assert report["pushed_files"] == ["README.md", "config.json", "lr_curve.png", "model.safetensors"]
    assert report["downloads_identical"] and report["same_config"] and report["same_tensors"]
    assert report["card_names_repo"]


def test_missing_repo_and_missing_file_are_named(report):
    kind, message = report["missing_repo"]
    assert kind == "FileNotFoundError" and "tester/does-not-exist" in message and "not found" in message
    kind, message = report["missing_file"]
    assert kind == "FileNotFoundError" and "tester/empty" in message and "config.json" in message


def test_failed_push_names_the_repo_and_keeps_local_files(report):
    kind, message = report["server_error"]
    assert kind == "OSError" and "tester/fail500-schedule" in message and "500" in message
    assert report["local_intact_after_server_error"]
    kind, message = report["unreachable"]
    assert kind == "OSError" and "tester/schedule" in message
    assert report["local_intact_after_unreachable"]
