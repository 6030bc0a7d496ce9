"""The hf-mlrs console command."""

import re

import pytest
import torch

from hf_mlrs import MLRSNet
from hf_mlrs.cli import main


@pytest.fixture
def schedule(tmp_path):
    torch.manual_seed(0)
    net = MLRSNet(stage_starts=[0.0, 0.5], provenance={"task": "cli-test", "lr_history": [[1, 1e-3], [2, 5e-4]]})
    net.stage_switch_losses[1] = 0.3
    net.save_pretrained(tmp_path / "s", write_card=False)
    return tmp_path / "s"


def test_info(schedule, capsys):
    assert main(["info", str(schedule)]) == 0
    out = capsys.readouterr().out
    assert "stages              2" in out and "cli-test" in out and "at loss 0.3" in out
    assert "0.001 -> 0.0005" in out


def test_plot(schedule, tmp_path, capsys):
    losses = tmp_path / "losses.txt"
    losses.write_text("1.0 0.9, 0.7\n0.5")
    assert main(["plot", str(schedule), "--out", str(tmp_path / "lr.png"), "--losses", str(losses)]) == 0
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses.write_text("1.0 nan")
    assert main(["plot", str(schedule), "--out", str(tmp_path / "lr2.png"), "--losses", str(losses)]) == 2
    assert "expected finite numbers" in capsys.readouterr().err


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing" / "deep" / "x")]) == 2
    assert capsys.readouterr().err.startswith("hf-mlrs: error: No schedule folder")


def test_list_shows_each_shipped_schedule_with_what_it_learned_on_and_how_it_transfers(capsys):
    from hf_mlrs import pretrained

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == pretrained.available()
    text_bbc = next(line for line in lines if line.startswith("text-bbc | "))  # its numbers change when remeasured
    # cards filled before the schedules' start_output said "tuned gamma" (the same thing where start_output is 1)
    assert re.fullmatch(r"text-bbc \| learned on: bbc/minilm-L2; 1 round\(s\), 4,000 steps \| transfer: held-out "
                        r"tasks: worst gap to the best tuned built-in [+-]\d+\.\d\d \(tuned (gamma|lr)\), "
                        r"[+-]\d+\.\d\d \(learned scale\), over \d+ cell\(s\)", text_bbc), text_bbc
    assert not any("not measured yet" in line for line in lines)  # every shipped schedule's transfer is measured


def test_list_line_of_a_zoo_entry_reads_its_provenance():
    from hf_mlrs.cli import summary_line

    provenance = {"learned_on": "bbc/minilm-L2; 1 round(s), 4,000 steps", "task": "ignored",
                  "transfer": {"summary": "held-out tasks: worst gap +0.30 (tuned gamma)"}}
    assert summary_line("text-bbc", provenance) == ("text-bbc | learned on: bbc/minilm-L2; 1 round(s), 4,000 steps "
                                                    "| transfer: held-out tasks: worst gap +0.30 (tuned gamma)")
    assert summary_line("x", {}) == "x | learned on: unknown | transfer: not measured yet"
