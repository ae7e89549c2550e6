"""The memory plan command on a tiny config, and the out-of-memory line of every command."""
import pytest

from fedfms_jax import config_cli, memory_plan, plan, run_config
from fedfms_jax.cli_errors import EXIT_OUT_OF_MEMORY, EXIT_USAGE, run_cli

TINY = "synthetic:tiny=true"  # 4 sites, one unseen: 3 clients of batch 2 at 64 px


def _run(capsys, *argv):
    code = run_cli(plan.main, list(argv), "plan")
    out, err = capsys.readouterr()
    return code, out, err


def test_device_peak_is_the_compiled_rounds_memory_analysis():
    cfg = config_cli.load_training_config(TINY, ())
    settings = dict(client_loop="vmap", remat=False, dtype="bfloat16")
    mem = memory_plan.device_peak(run_config.with_plan_settings(cfg, settings), 3, 1)
    assert mem["peak_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                                 + mem["temp_bytes"])
    assert mem["temp_bytes"] > 0 and mem["argument_bytes"] > 0


def test_plan_measures_the_config_as_given(capsys):
    # One real compile: the fastest candidate fits a generous budget.
    code, out, err = _run(capsys, "--config", TINY, "--memory-gb", "1000", "--devices", "1")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == \
        "--config.model.dtype=bfloat16 --config.client_loop=vmap --config.model.remat=false"
    assert "3 clients x batch 2 at 64 px" in out and "peak" in out


# Peaks (GB) per candidate, for the choice logic without compiling.
FAKE_PEAKS = {("vmap", False): 50.0, ("sequential", False): 30.0, ("vmap", True): 20.0, ("sequential", True): 12.0}


@pytest.fixture
def fake_peaks(monkeypatch):
    seen = []

    def device_peak(cfg, clients_per_device, steps):
        key = (cfg.client_loop, cfg.model.remat)
        seen.append((key, clients_per_device, cfg.model.dtype))
        return dict(peak_bytes=int(FAKE_PEAKS[key] * memory_plan.GB), compile_s=0.0)

    monkeypatch.setattr(memory_plan, "device_peak", device_peak)
    return seen


@pytest.mark.parametrize("budget, expected", [
    (64, "--config.client_loop=vmap --config.model.remat=false"),
    (40, "--config.client_loop=sequential --config.model.remat=false"),
    (24, "--config.client_loop=vmap --config.model.remat=true"),
    (12, "--config.client_loop=sequential --config.model.remat=true"),
])
def test_plan_chooses_the_fastest_candidate_that_fits(capsys, fake_peaks, budget, expected):
    code, out, err = _run(capsys, "--config", TINY, "--memory-gb", str(budget), "--devices", "2")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"--config.model.dtype=bfloat16 {expected}"
    # Fastest first, stopping at the first fit; 3 clients over 2 devices: 2 per device.
    order = [k for k, _, _ in fake_peaks]
    assert order == list(memory_plan.CANDIDATES[:len(order)]) and FAKE_PEAKS[order[-1]] <= budget
    assert all(c == 2 and d == "bfloat16" for _, c, d in fake_peaks)


def test_plan_says_what_does_not_fit_in_one_line(capsys, fake_peaks):
    code, out, err = _run(capsys, "--config", TINY, "--memory-gb", "8", "--devices", "1")
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not fit 8 GB" in lines[0] and "needs 12.0 GB" in lines[0]
    assert "at least 12 GB" in lines[0] and "--config.batch_size" in lines[0]  # the smallest change
    assert not any(line.startswith("--config.") for line in out.splitlines())


@pytest.mark.parametrize("argv", [
    ["--config", TINY],                                     # no --memory-gb
    ["--config", TINY, "--memory-gb", "-3"],
    ["--config", TINY, "--memory-gb", "lots"],
    ["--config", TINY, "--memory-gb", "8", "--devices", "0"],
    ["--config", TINY, "--memory-gb", "8", "--config.no_such_field=1"],
])
def test_bad_input_is_one_line_exit_2(capsys, argv):
    code, out, err = _run(capsys, *argv)
    assert code == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1 and err.startswith("plan: error:")


def test_out_of_memory_points_at_the_plan(capsys):
    def main(argv):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")

    code = run_cli(main, ["--config", "prostate:method=fedsam", "--config.rounds=5", "--workdir", "w"], "train")
    err = capsys.readouterr().err
    assert code == EXIT_OUT_OF_MEMORY
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "python -m fedfms_jax.plan --config prostate:method=fedsam --config.rounds=5 --memory-gb" in lines[0]

    def other(argv):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        run_cli(other, [], "train")


def test_paper_config_plans_before_its_weights_exist(capsys, fake_peaks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights/sam_vit_b here
    code, out, err = _run(capsys, "--config", "prostate:method=fedsam", "--memory-gb", "141", "--devices", "1")
    assert code == 0, err
    assert "5 clients x batch 6 at 1024 px" in out  # six sites, one held out
    assert [c for _, c, _ in fake_peaks] == [5]


# ------------------------------------------------------------------ plan=auto in training
def test_paper_configs_plan_by_themselves_and_the_demo_does_not():
    assert config_cli.load_training_config("prostate:method=fedsam", ())["plan"] == "auto"
    assert config_cli.load_training_config("demo", ())["plan"] == "off"


def test_auto_plan_on_a_device_without_a_memory_limit_keeps_the_config(fake_peaks):
    cfg = config_cli.load_training_config(TINY, [("plan", "auto")])
    lines = []
    assert memory_plan.auto_settings(cfg, log=lines.append) is None
    assert fake_peaks == []  # nothing compiled
    assert len(lines) == 1 and "no memory limit" in lines[0] and "--config.plan_memory_gb=N" in lines[0]


def _train(capsys, *argv):
    from fedfms_jax import train
    code = run_cli(train.main, list(argv), "train")
    out, err = capsys.readouterr()
    return code, out, err


def test_training_takes_the_planned_settings_and_keeps_them_on_resume(capsys, fake_peaks, tmp_path):
    import json

    from fedfms_jax import workdir as wd

    work = tmp_path / "run"
    argv = ["--config", TINY, "--config.plan=auto", "--config.plan_memory_gb=40", "--config.rounds=1",
            "--workdir", str(work)]
    code, out, err = _train(capsys, *argv)
    assert code == 0, err
    chosen = dict(client_loop="sequential", remat=False, dtype="bfloat16")  # 40 GB: vmap (50) does not fit
    assert f"[plan] chosen: {memory_plan.overrides(chosen)}" in out
    assert json.loads((work / wd.PLAN_FILE).read_text()) == chosen
    stored = json.loads((work / wd.CONFIG_FILE).read_text())  # the config as given ...
    assert stored["client_loop"] == "vmap" and stored["model"]["dtype"] == "float32"
    ran = wd.load_config(work)                                 # ... and as it ran
    assert (ran.client_loop, ran.model.remat, ran.model.dtype) == ("sequential", False, "bfloat16")
    assert json.loads((work / "final" / "model.json").read_text())["config"]["dtype"] == "bfloat16"

    planned = len(fake_peaks)
    code, out, err = _train(capsys, *argv)  # the same command again: resumes without planning
    assert code == 0, err
    assert len(fake_peaks) == planned
    assert "[plan] as chosen when this work dir was made" in out


def test_training_that_fits_nowhere_stops_before_writing(capsys, fake_peaks, tmp_path):
    work = tmp_path / "run"
    code, out, err = _train(capsys, "--config", TINY, "--config.plan=auto", "--config.plan_memory_gb=8",
                            "--workdir", str(work))
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not fit 8 GB" in lines[0]
    assert not work.exists()
