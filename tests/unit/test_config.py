"""Config validation: every problem reported at once, one line each, naming file, line, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from linewatch import config as cfgmod
from linewatch.cli import main
from linewatch.configdoc import render_default as render

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_shipped_config_is_valid_and_is_the_generated_one():
    """Guards against config.toml drifting from the models it documents."""
    cfgmod.load(ROOT / "config.toml")
    assert (ROOT / "config.toml").read_text() == render(), \
        "config.toml differs from the models: run `python -m linewatch.configdoc > config.toml`"


@pytest.mark.parametrize("name", ["config.small-cpu.toml", "config.postgres.toml"])
def test_deploy_example_configs_are_valid(name):
    """The examples the README points to (the GenICam one needs its vendor producer: tested with
    the simulated one in tests/integration/test_genicam_source.py)."""
    cfg = cfgmod.load(ROOT / "deploy" / name)
    if name == "config.postgres.toml":
        assert cfg.store.url.startswith("postgresql+psycopg://")


def test_wrong_type_names_file_line_key_and_value(tmp_path):
    p = write(tmp_path, '[ring]\nslots = "many"\n')
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    (line,) = ei.value.lines
    assert line.startswith(f"{p}:2: ring.slots = 'many': ")
    assert "integer" in line


def test_unknown_key_is_rejected(tmp_path):
    p = write(tmp_path, "[lots]\npart_cont = 5\n")
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    assert ei.value.lines == [f"{p}:2: lots.part_cont = 5: unknown key (not part of linewatch's config)"]


def test_all_errors_at_once_one_line_each(tmp_path):
    p = write(tmp_path, "[ring]\nslots = 1\npolicy = 'sometimes'\n[lots]\nbogus = true\n"
                        "[threshold]\nk_mad = -1\n")
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    keys = [ln.split(": ")[1].split(" =")[0] for ln in ei.value.lines]
    assert sorted(keys) == ["lots.bogus", "ring.policy", "ring.slots", "threshold.k_mad"]
    assert all("\n" not in ln for ln in ei.value.lines)


def test_missing_cti_file_is_a_config_error(tmp_path):
    p = write(tmp_path, f'[source]\nkind = "genicam"\ncti = "{tmp_path}/nope.cti"\n')
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    assert ei.value.lines == [f"{p}:3: source.cti = '{tmp_path}/nope.cti': GenTL producer file not found"]


def test_not_toml_and_missing_file(tmp_path):
    p = write(tmp_path, "[ring\n")
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    assert "not valid TOML" in ei.value.lines[0]
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(tmp_path / "absent.toml")
    assert "config file not found" in ei.value.lines[0]


def test_check_config_exit_codes_and_print(tmp_path, capsys):
    bad = write(tmp_path, "[ring]\nslots = 'x'\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "ring.slots" in err and "Traceback" not in err
    assert main(["check-config", str(ROOT / "config.toml")]) == 0
    assert capsys.readouterr().out.strip().endswith("config.toml: OK")
    assert main(["check-config", "--print", str(ROOT / "config.toml")]) == 0
    printed = capsys.readouterr().out
    assert "[ring]" in printed and "drain_timeout_s = " in printed
    # the printed effective config is itself a valid config with the same values
    assert cfgmod.parse(printed) == cfgmod.load(ROOT / "config.toml")


def test_reload_diff_names_changed_keys():
    a = cfgmod.parse("")
    b = cfgmod.parse("[threshold]\nk_mad = 6.0\n[ring]\nslots = 8\n")
    assert cfgmod.diff(a, b) == {"threshold": ["k_mad"], "ring": ["slots"]}
    live = cfgmod.live_fields()
    assert live["threshold.k_mad"] is True and live["ring.slots"] is False


def test_missing_or_unknown_kind_names_the_choices(tmp_path):
    p = write(tmp_path, "[engine]\nthreads = 2\n")
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    assert ei.value.lines[0].startswith(f"{p}:1: engine.kind is missing; expected one of 'zeroshot'")
    p = write(tmp_path, '[source]\nkind = "usb"\n')
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    assert ei.value.lines == [f"{p}:2: source.kind = 'usb': unknown kind; expected one of "
                              "'synthetic', 'replay', 'genicam'"]


def test_infinite_values_and_lots_that_cannot_close_are_rejected(tmp_path):
    """An inf timeout would reach Queue.get / Thread.join and kill a thread; an idle policy
    without a gap, or a line policy without a line node, would keep one lot open for ever."""
    p = write(tmp_path, "[store]\nflush_interval_s = inf\n")
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    assert ei.value.lines[0].startswith(f"{p}:2: store.flush_interval_s = inf: ")
    for text, why in (('[lots]\npolicy = "idle"\n', "idle_gap_s > 0"),
                      ('[lots]\npolicy = "line"\n', "line_value_node")):
        with pytest.raises(cfgmod.ConfigError) as ei:
            cfgmod.load(write(tmp_path, text))
        assert why in "\n".join(ei.value.lines)
    cfgmod.load(write(tmp_path, '[lots]\npolicy = "idle"\nidle_gap_s = 2.0\n'))


def test_what_validated_but_never_worked_is_a_config_error(tmp_path):
    """Regression, each of these passed check-config: a threshold window smaller than its
    min_scores (the threshold never calibrated: every frame NOT_INSPECTED for ever), a store URL
    and an endpoint the daemon refuses at its next start, a device name torch does not know."""
    p = write(tmp_path, '[threshold]\nwindow = 16\nmin_scores = 32\n')
    with pytest.raises(cfgmod.ConfigError, match="min_scores .32. must not exceed window .16."):
        cfgmod.load(p)
    p = write(tmp_path, '[store]\nurl = "postgres://u@h/db"\n')
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    (line,) = ei.value.lines
    assert line.startswith(f"{p}:2: store.url 'postgres://u@h/db'")
    p = write(tmp_path, '[publish]\nendpoint = "127.0.0.1:5556"\n')
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    assert ei.value.lines == [f"{p}:2: publish.endpoint = '127.0.0.1:5556': not a ZeroMQ endpoint "
                              "(tcp://host:port, ipc://path)"]
    p = write(tmp_path, '[publish]\nendpoint = "tcp://*:5556"\ncontrol_endpoint = "tcp://[::1]:5557"\n')
    cfgmod.load(p)
    p = write(tmp_path, '[engine]\nkind = "zeroshot"\ndevice = "gpu"\n')
    with pytest.raises(cfgmod.ConfigError, match="engine.device = 'gpu': not a torch device"):
        cfgmod.load(p)


def test_a_cuda_device_without_cuda_is_a_config_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = write(tmp_path, '[engine]\nkind = "zeroshot"\ndevice = "cuda"\n')
    with pytest.raises(cfgmod.ConfigError, match="engine.device = 'cuda': no CUDA device here"):
        cfgmod.load(p)


def test_a_misspelled_section_and_a_cross_field_error_name_their_line(tmp_path):
    """Regression: both came without a line number (and the check's message with pydantic's
    'Value error, ' in front)."""
    p = write(tmp_path, '[daemon]\nline = "l1"\n\n[treshold]\nk_mad = 3\n\n[threshold]\nwindow = 16\nmin_scores = 32\n')
    with pytest.raises(cfgmod.ConfigError) as ei:
        cfgmod.load(p)
    lines = sorted(ei.value.lines)
    assert lines[0].startswith(f"{p}:4: treshold = ") and "unknown key" in lines[0]
    assert lines[1].startswith(f"{p}:7: threshold = '{{...}}': min_scores (32) must not exceed window (16)")
