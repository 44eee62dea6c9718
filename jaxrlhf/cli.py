"""The ``jaxrlhf`` command line: ``jaxrlhf <command> --config configs/<x>.yaml --set key=value …``.

A command is a config class plus a function that runs it (given as ``"module:name"`` strings, imported
only when needed, so ``jaxrlhf --help`` is instant). Adding one is one function and one line in
:data:`COMMANDS`. ``jaxrlhf <command> --help`` lists every config key with its type, default and comment
(generated from the config classes); ``--print-config`` prints the resolved config as YAML (reusable with
``--config``) and runs nothing. Expected failures (bad config, bad data, bad checkpoint, a checkpoint
that cannot be written, a user's reward function that fails, too many non-finite steps) print one line to
stderr and exit 1; ``--debug`` shows the traceback instead. SIGINT / SIGTERM (Ctrl-C, ``kill``) during
training end the current step, write a checkpoint and exit 128 + the signal number with one line saying
where the checkpoint is; the same command then resumes. Import paths in a config (``reward.function``,
``task.oracle``) import from the working directory, as ``python -m`` would.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple


class Command(NamedTuple):
    config: str  # "module:ConfigClass"
    run: str  # "module:function", called with the loaded config; may return an object with run_dir
    help: str
    quick: str | None = None  # "module:OVERRIDES": a --quick flag applies these before the --set ones
    full: str | None = None  # "module:OVERRIDES": a --full flag applies these before the --set ones


COMMANDS: dict[str, Command] = {
    "sft": Command(
        "jaxrlhf.train.sft:SFTRunConfig",
        "jaxrlhf.train.sft:train_sft",
        "supervised fine-tuning on prompt/completion pairs",
    ),
    "reward": Command(
        "jaxrlhf.train.reward:RewardRunConfig",
        "jaxrlhf.train.reward:train_reward_model",
        "train a reward model on preferences, rankings or ratings",
    ),
    "ppo": Command(
        "jaxrlhf.train.rl:PPORunConfig",
        "jaxrlhf.train.rl:train_rl",
        "PPO fine-tuning against a reward model or reward function",
    ),
    "a2c": Command(
        "jaxrlhf.train.rl:A2CRunConfig",
        "jaxrlhf.train.rl:train_rl",
        "A2C fine-tuning against a reward model or reward function",
    ),
    "grpo": Command(
        "jaxrlhf.train.rl:GRPORunConfig",
        "jaxrlhf.train.rl:train_rl",
        "GRPO, critic-free (and Dr. GRPO, DAPO, GSPO by config: configs/dr_grpo.yaml, dapo.yaml, "
        "gspo.yaml) against a reward model or a (verifiable) reward function",
    ),
    "rloo": Command(
        "jaxrlhf.train.rl:RLOORunConfig",
        "jaxrlhf.train.rl:train_rl",
        "RLOO, critic-free (and REINFORCE++, ReMax by config: configs/reinforce_pp.yaml, remax.yaml) "
        "against a reward model or a (verifiable) reward function",
    ),
    "task-data": Command(
        "jaxrlhf.train.task_data:TaskDataConfig",
        "jaxrlhf.train.task_data:write_task_data",
        "write a built-in task's SFT demonstrations, RL and held-out prompts (disjoint splits) as JSONL, "
        "and its tokenizer, for RL on its verifiable reward (reward.function=task:<name>)",
    ),
    "dpo": Command(
        "jaxrlhf.train.dpo:DPORunConfig",
        "jaxrlhf.train.dpo:train_dpo",
        "direct preference optimisation (DPO, IPO, cDPO, hinge) of a policy on preference pairs",
    ),
    "ilql": Command(
        "jaxrlhf.train.ilql:ILQLRunConfig",
        "jaxrlhf.train.ilql:train_ilql",
        "offline value-based RL (ILQL: token-level Q and V heads) on rated responses, for value-guided "
        "decoding",
    ),
    "demo": Command(
        "jaxrlhf.experiments.demo_config:DemoConfig",
        "jaxrlhf.experiments.demo:demo",
        "the whole RLHF pipeline on a synthetic task with a known gold reward: SFT, reward model "
        "from simulated feedback; PPO, A2C, GRPO, RLOO, DPO, best-of-n, GRPO on the gold reward and PPO "
        "against reward-model ensembles compared on held-out prompts; writes a report with plots",
        quick="jaxrlhf.experiments.demo_config:QUICK_OVERRIDES",
        full="jaxrlhf.experiments.demo_config:FULL_OVERRIDES",
    ),
}

# ``jaxrlhf study <name>``: the studies on the pure pipeline (jaxrlhf.experiments.studies).
STUDIES: dict[str, Command] = {
    "choices": Command(
        "jaxrlhf.experiments.studies.choices:ChoicesStudyConfig",
        "jaxrlhf.experiments.studies.choices:run_choices_study",
        "PPO implementation choices, each toggled alone from the defaults, paired across seeds: gold "
        "reward and KL with intervals over seeds",
        quick="jaxrlhf.experiments.studies.choices:QUICK_OVERRIDES",
    ),
    "feedback": Command(
        "jaxrlhf.experiments.studies.feedback:FeedbackStudyConfig",
        "jaxrlhf.experiments.studies.feedback:run_feedback_study",
        "feedback type (pairwise, k-wise, ratings), annotator noise and set size at an equal annotation "
        "budget: reward-model agreement with the oracle and the gold reward PPO reaches",
        quick="jaxrlhf.experiments.studies.feedback:QUICK_OVERRIDES",
    ),
}
STUDY_HELP = "studies on the pure pipeline, across seeds: 'choices' or 'feedback'"


def command_spec(name: str) -> Command:
    """The command ``name``: a key of :data:`COMMANDS`, or ``"study <name>"`` for a study."""
    group, _, study = name.partition(" ")
    return STUDIES[study] if group == "study" and study else COMMANDS[name]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _resolve(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The failures a user can fix (reported in one line); anything else is a bug and shows a traceback."""
    from jaxrlhf.config import ConfigError
    from jaxrlhf.data import DataError
    from jaxrlhf.files import OutputWriteError
    from jaxrlhf.models.config import UnsupportedModelError
    from jaxrlhf.models.hf_io import CheckpointFormatError
    from jaxrlhf.oracle import RewardFunctionError
    from jaxrlhf.train.checkpoint import (
        CheckpointMismatchError,
        CheckpointWriteError,
        NonFiniteCheckpointError,
    )
    from jaxrlhf.train.nonfinite import NonFiniteError

    return (
        ConfigError,
        DataError,
        CheckpointFormatError,
        UnsupportedModelError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        NonFiniteError,
        NonFiniteCheckpointError,
        CheckpointMismatchError,
        CheckpointWriteError,
        RewardFunctionError,
        OutputWriteError,
    )


class _HelpWithConfigKeys(argparse.Action):
    """``-h/--help`` of a command: the usual help, then every config key (importing the config class)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import shutil

        from jaxrlhf.config import format_config_help

        words = parser.prog.split()
        name = " ".join(words[-2:]) if words[-2] == "study" else words[-1]
        config_class = _resolve(command_spec(name).config)
        width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 100) - 2)
        keys = format_config_help(config_class, width=width)
        print(parser.format_help())
        print(f"config keys of {config_class.__name__} (set with --set KEY=VALUE or in the YAML file; "
              "values are YAML):\n")
        print(keys, end="")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrlhf",
        description="RLHF in JAX: supervised fine-tuning, reward models, PPO, A2C and the critic-free "
        "GRPO / RLOO families.",
        epilog="Example: jaxrlhf ppo --config configs/ppo.yaml --set optimizer.learning_rate=3e-6. "
        "Every config key, its type and default: jaxrlhf COMMAND --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        _command_arguments(sub.add_parser(name, help=command.help, description=command.help, add_help=False),
                           command)
    study = sub.add_parser("study", help=STUDY_HELP, description=STUDY_HELP)
    studies = study.add_subparsers(dest="study", metavar="STUDY", required=True)
    for name, command in STUDIES.items():
        _command_arguments(studies.add_parser(name, help=command.help, description=command.help,
                                              add_help=False), command)
    return parser


def _command_arguments(p: argparse.ArgumentParser, command: Command) -> None:
    """The options every command takes (and --quick where it has a preset)."""
    p.add_argument(
        "-h", "--help", action=_HelpWithConfigKeys, help="show this help and every config key, then exit"
    )
    p.add_argument("--config", metavar="YAML", help="config file (see configs/); defaults when omitted")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a config value, e.g. --set train.steps=100 (repeatable; values are "
        "YAML: 3, 1e-5, true, [1,2], null)",
    )
    if command.quick is not None:
        p.add_argument("--quick", action="store_true",
                       help="small sizes for a smoke run (demo about 1.5 min, a study 3–5 min on 2 cores)")
    if command.full is not None:
        p.add_argument("--full", action="store_true", help="the full study: every method over eight seeds")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML, after --config and --set) and exit without running",
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback on an error")


def config_yaml(config: Any) -> str:
    """A config as YAML that ``--config`` reads back to the same config."""
    import yaml

    from jaxrlhf.config import to_dict

    class Dumper(yaml.SafeDumper):
        pass

    def sequence(dumper: yaml.SafeDumper, items: list) -> Any:
        # Lists of numbers and strings on one line ([16, 32]), as one writes them in configs/.
        flow = all(not isinstance(v, (dict, list)) for v in items)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow)

    Dumper.add_representer(list, sequence)
    return yaml.dump(to_dict(config), Dumper=Dumper, sort_keys=False, default_flow_style=False, width=100)


def load_command_config(name: str, path: str | None, overrides: Sequence[str],
                        preset: Sequence[str] = (), preset_name: str = "the preset") -> Any:
    """The command's config (``name`` as :func:`command_spec` reads it) from ``path``, a ``preset``
    (``--quick``/``--full``'s overrides) and ``overrides``; every invalid value is a ``ConfigError``."""
    from jaxrlhf.config import ConfigError, load_config

    try:
        return load_config(_resolve(command_spec(name).config), path, overrides, preset, preset_name)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a section's own validation (__post_init__)
        raise ConfigError(f"{path or 'defaults'}: {e}") from None


def command_name(args: argparse.Namespace) -> str:
    """``ppo``, ``study choices``, …: the name :func:`command_spec` takes, from a parsed command line."""
    return f"study {args.study}" if args.command == "study" else args.command


def config_from_args(args: argparse.Namespace) -> Any:
    """The config a parsed command line runs with: defaults, ``--config``, the ``--quick``/``--full`` preset,
    then the ``--set`` overrides."""
    name = command_name(args)
    command = command_spec(name)
    if getattr(args, "quick", False) and getattr(args, "full", False):
        from jaxrlhf.config import ConfigError

        raise ConfigError("--quick and --full: choose one preset")
    preset, preset_name = (), "the preset"
    if getattr(args, "quick", False):
        preset, preset_name = _resolve(command.quick), "--quick"
    if getattr(args, "full", False):
        preset, preset_name = _resolve(command.full), "--full"
    return load_command_config(name, args.config, list(args.overrides), list(preset), preset_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the process exit code (0 on success)."""
    args = build_parser().parse_args(argv)
    expected = _expected_errors()
    name = command_name(args)
    command = command_spec(name)
    try:
        config = config_from_args(args)
        if args.print_config:
            print(config_yaml(config), end="")
            return EXIT_OK
        result = _resolve(command.run)(config)
    except KeyboardInterrupt:
        print(f"jaxrlhf {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        from jaxrlhf.train.signals import RunInterrupted

        if isinstance(e, RunInterrupted):  # stopped on SIGINT / SIGTERM after writing a checkpoint
            print(f"jaxrlhf {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        if args.debug or not isinstance(e, expected):
            raise
        print(f"jaxrlhf {name}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    run_dir = getattr(result, "run_dir", None)
    if run_dir is not None and str(run_dir) not in (getattr(result, "summary", None) or ""):
        print(f"run directory: {run_dir}")
    return EXIT_OK


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ValueError | RuntimeError) else f"{type(e).__name__}: {text}"


def console(argv: Sequence[str] | None = None) -> int:
    """The ``jaxrlhf`` console script (and ``python -m jaxrlhf.cli``): :func:`main` in a process that keeps
    its freed host memory for the next step instead of faulting it in again (:mod:`jaxrlhf.host_memory`).
    A ``study`` process also keeps reductions out of XLA:CPU's YNNPACK fusions (:mod:`jaxrlhf.xla_flags`),
    set before JAX starts."""
    from jaxrlhf.host_memory import retain_freed_memory
    from jaxrlhf.xla_flags import STUDY_FLAGS, set_flags_before_start

    argv = sys.argv[1:] if argv is None else list(argv)
    retain_freed_memory()
    if argv[:1] == ["study"] and "-h" not in argv and "--help" not in argv:
        set_flags_before_start(STUDY_FLAGS)
    code = main(argv)
    if code == EXIT_ERROR:
        # The error is reported and the run closed. A checkpoint write that failed can leave orbax's
        # signalling threads (not daemons) waiting 300 s for a barrier that never comes, which would hold
        # the process that long after its one-line error: end it now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(console())
