"""luna.cli.run_stage: one Hydra start-up, one-line user errors and the same exit codes for every subcommand."""
from __future__ import annotations

import pytest

from luna.cli import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, SUBCOMMANDS, StageFailed, compose,
                      main, run_stage)


def _run(tmp_path, task, *extra):
    return run_stage("luna make-tiny", "make_tiny", task, [f"out={tmp_path}", *extra])


def test_the_task_gets_the_composed_config_and_success_exits_0(tmp_path):
    seen = {}
    assert _run(tmp_path, lambda cfg: seen.update(n=cfg.n, out=cfg.out), "n=5") == EXIT_OK
    assert seen == {"n": 5, "out": str(tmp_path)}


@pytest.mark.parametrize("error", [ValueError("n=0: must be >= 1"), FileNotFoundError("no /x/y.safetensors")])
def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys, error):
    def task(cfg):
        raise error

    assert _run(tmp_path, task) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.strip() == f"luna make-tiny: error: {error}" and "Traceback" not in err


def test_a_failed_run_exits_with_its_code_and_a_bug_with_1(tmp_path, capsys):
    def failed(cfg):
        raise StageFailed("2 units failed on every retry; finished shards are kept")

    assert _run(tmp_path, failed) == EXIT_FAILED
    assert capsys.readouterr().err.strip() == "luna make-tiny: 2 units failed on every retry; finished shards are kept"

    def corrupt(cfg):
        raise StageFailed("1 corrupt shard", code=3)

    assert _run(tmp_path, corrupt) == 3

    def bug(cfg):
        raise RuntimeError("a bug")

    assert _run(tmp_path, bug) == EXIT_FAILED
    assert "RuntimeError: a bug" in capsys.readouterr().err  # a bug keeps its traceback


def test_ctrl_c_exits_130_with_the_resume_hint(tmp_path, capsys):
    def task(cfg):
        raise KeyboardInterrupt

    code = run_stage("luna factory", "make_tiny", task, [f"out={tmp_path}"], interrupted="rerun to resume")
    assert code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "luna factory: interrupted; rerun to resume"


def test_a_rejected_override_exits_2_without_running_the_task(tmp_path, capsys):
    ran = []
    assert _run(tmp_path, ran.append, "no_such_key=1") == EXIT_USER_ERROR
    assert ran == [] and "no_such_key" in capsys.readouterr().err


def test_compose_merges_plain_values_without_quoting(tmp_path):
    odd = tmp_path / "a b, c'd [e]"
    cfg = compose("make_tiny", ["n=3"], {"out": str(odd), "families": ["base"]})
    assert cfg.out == str(odd) and cfg.n == 3 and list(cfg.families) == ["base"]


def test_compose_inside_a_running_stage_leaves_the_stage_as_it_was(tmp_path):
    """The demo composes every stage's config while its own Hydra app runs."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    seen = {}

    def task(cfg):
        seen["refine_tile"] = compose("refine", ["preset=tiny"]).refine.tile
        seen["still_running"] = HydraConfig.initialized() and GlobalHydra.instance().is_initialized()

    assert _run(tmp_path, task) == EXIT_OK
    assert seen == {"refine_tile": 256, "still_running": True}


def test_every_subcommand_module_has_main():
    import importlib

    for name, (module, _) in SUBCOMMANDS.items():
        assert callable(importlib.import_module(module).main), name
    assert main(["no-such-sub"]) == EXIT_USER_ERROR


@pytest.mark.parametrize("prompt", ["a, b [c]", "dir C:\\x\\", "price ${x}", "it's \\' odd", "end\\\\", "\\${y} and $",
                                    "'", "a=b, c:d {e}", "'already quoted'"])
def test_free_text_prompts_reach_the_config_verbatim(prompt):
    """`luna refine prompt=...` takes the text as typed: commas, brackets, backslashes, quotes and `${`."""
    from luna.cli import compose, quote_free_text
    from luna.settings import plain

    cfg = plain(compose("refine", quote_free_text([f"prompt={prompt}"], ["prompt"]), {}))
    want = prompt[1:-1] if prompt == "'already quoted'" else prompt  # a quoted value is Hydra's to unquote
    assert cfg["prompt"] == want
