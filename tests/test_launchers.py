"""Launchers pass our flags through. torchrun's and deepspeed's parsers take, even after the script's name, any
flag of ours that is a prefix of one of their own options (argparse's abbreviations): ``torchrun ...
tools/evaluate.py --num 6`` stopped with 'ambiguous option: --num could match --numa-binding, --numa_binding'.
Every flag of every tool a launcher starts (train, evaluate, infer) is checked against both launchers' option
lists as the installed versions define them."""
import argparse

import pytest

from tryon_ds import train
from tryon_ds.tools import evaluate, infer


class _Parsed(Exception):
    pass


def _parser_of(entry, argv):
    """The ArgumentParser ``entry(argv)`` builds, caught as it parses."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        entry(argv)
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    assert seen, f"{entry} built no parser"
    return seen[0]


def _options(parser, hidden=True):
    """A parser's long options; ``hidden=False`` leaves out those no user types (help=SUPPRESS: the deepspeed
    launcher's own --local_rank, which it hands to the script itself, past every parser)."""
    return {o for a in parser._actions for o in a.option_strings
            if o.startswith("--") and (hidden or a.help != argparse.SUPPRESS)}


def _launchers():
    import deepspeed.launcher.runner as deepspeed_runner
    import torch.distributed.run as torchrun
    return {"torchrun": _options(torchrun.get_args_parser()),
            "deepspeed": _options(_parser_of(deepspeed_runner.parse_args, ["script.py"]))}


@pytest.mark.parametrize("tool", ["train", "evaluate", "infer"])
def test_no_flag_of_a_tool_a_launcher_starts_is_a_launchers_option_or_a_prefix_of_one(tool):
    entry = {"train": train.parse_args, "evaluate": evaluate.parse_args, "infer": infer.main}[tool]
    ours = _options(_parser_of(entry, []), hidden=False)
    assert "--help" in ours and len(ours) > 5
    for launcher, theirs in _launchers().items():
        assert "--num_gpus" in theirs or "--nproc_per_node" in theirs
        taken = sorted((mine, their) for mine in ours - {"--help"} for their in theirs if their.startswith(mine))
        assert not taken, f"{launcher} would take {tool}'s flags: {taken}"


def test_the_old_subset_flag_was_taken_by_both_launchers():
    """The check above finds the reported case: ``--num`` is a prefix of both launchers' options."""
    for launcher, theirs in _launchers().items():
        assert any(o.startswith("--num") for o in theirs), launcher
