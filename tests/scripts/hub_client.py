"""Push and load schedules against tests/hub_server.py; run in its own process (see tests/test_hub.py).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported, so the server starts first and the client is
imported after the environment points at it. Prints one JSON object with what happened.
"""

import json
import os
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.hub_server import FakeHub  # noqa: E402


def files_of(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def error_of(call):
    try:
        call()
    except Exception as err:  # the test asserts on the type and message
        return [type(err).__name__, str(err)]
    return None


def main():
    hub = FakeHub().__enter__()
    tmp = tempfile.mkdtemp()
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_test_token", HF_HOME=tmp, HF_HUB_DISABLE_XET="1")

    import torch
    from huggingface_hub import hf_hub_download

    from hf_mlrs import MLRSNet

    torch.manual_seed(0)
    net = MLRSNet(stage_starts=[0.0, 0.5], provenance={"task": "hub-test", "steps": 7})
    net.stage_switch_losses[1] = 0.25
    report = {"commit": net.push_to_hub("tester/schedule")}
    stored = hub.repos["tester/schedule"]["files"]
    report["pushed_files"] = sorted(stored)
    report["downloads_identical"] = all(
        Path(hf_hub_download("tester/schedule", name)).read_bytes() == content for name, content in stored.items())
    loaded = MLRSNet.from_pretrained("tester/schedule")
    report["same_config"] = loaded.config() == net.config()
    report["same_tensors"] = all(
        torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))
        for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    report["card_names_repo"] = b"tester/schedule" in stored["README.md"]

    report["missing_repo"] = error_of(lambda: MLRSNet.from_pretrained("tester/does-not-exist"))
    hub.repos["tester/empty"] = {"files": {}, "commit": "1" * 40}
    report["missing_file"] = error_of(lambda: MLRSNet.from_pretrained("tester/empty"))

    local = Path(tmp) / "saved"
    net.save_pretrained(local)
    before = files_of(local)
    report["server_error"] = error_of(lambda: net.push_to_hub("tester/fail500-schedule"))
    report["local_intact_after_server_error"] = files_of(local) == before

    hub.stop()  # from here on the Hub is unreachable
    report["unreachable"] = error_of(lambda: net.push_to_hub("tester/schedule"))
    report["local_intact_after_unreachable"] = files_of(local) == before
    print(json.dumps(report))


if __name__ == "__main__":
    main()
