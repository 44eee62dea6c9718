"""The README's commands and code, run as written, so that the README cannot drift from the code.

The convention (also in the README's "Development" paragraph):

- Every ```` ```bash ```` block runs: each line (``\\`` continues a line; ``#`` starts a comment) must be a
  ``jaxrlhf`` command. The suite appends tiny sizes (:data:`TINY`: two steps, no TensorBoard, no progress
  bar, no FLOP probe; a smaller demo) for the keys the command's config has and the command does not set
  itself.
- Every ```` ```python ```` block runs (``exec``), in README order with the commands; one whose first line is
  ``# file: NAME`` is instead written to ``NAME`` before anything runs (a user's module, e.g. the reward
  functions the commands name).
- A ``<!-- readme-test: … -->`` line right above a block adjusts it: ``skip (why)``; ``--set key=value …``
  (more overrides for its commands); ``append …`` (any further arguments, e.g. ``--quick``).
- Everything runs in one temporary directory holding a copy of ``configs/``, the user's model in
  ``my-model/`` (a BPE tokenizer trained with ``tokenizers``, with a chat template, and a random Llama saved
  by ``transformers``' ``save_pretrained``) and the data files ``sft.jsonl``, ``prefs.jsonl`` and
  ``prompts.jsonl`` (whose records carry an ``answer`` column). A new command written with these names is
  picked up and run as it is.
- Commands run in-process through :func:`jaxrlhf.cli.main`, except the first one naming an import path
  into the working directory (``my_rewards:…``), which runs through the real ``jaxrlhf`` console script in
  a subprocess: that is where the working directory is not on ``sys.path`` by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf import cli
from jaxrlhf.config import describe_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DATA_FILES = ("sft.jsonl", "prefs.jsonl", "prompts.jsonl")
MODEL_DIR = "my-model"
# Appended to every command whose config has the key (and that does not set it): a run of two steps, and
# for the demo (after its --quick preset) a smaller SFT, feedback and evaluation: the stages still all run.
TINY = (
    "train.steps=2",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.mfu_matmul_size=0",
    "logging.log_every=1",
    "sft.demonstrations=128",
    "sft.steps=10",
    "feedback.prompts=128",
    "reward.steps=4",
    "evaluation.prompts=16",
    "evaluation.best_of_n_prompts=4",
    "evaluation.best_of_n_samples=16",
    "evaluation.best_of_n=[1,4,16]",
    "evaluation.chunk_size=64",
    "run.progress_bar=false",
)
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    language: str
    code: str
    line: int  # README line of the opening fence
    directive: str = ""  # the readme-test comment above it, if any

    @property
    def skipped(self) -> bool:
        return self.directive.startswith("skip")

    @property
    def file_name(self) -> str | None:
        first = self.code.splitlines()[0] if self.code else ""
        m = re.match(r"#\s*file:\s*(\S+)\s*$", first)
        return m.group(1) if m else None

    def extra_arguments(self) -> list[str]:
        """The arguments the directive adds to each command (``--set …`` or ``append …``)."""
        text = self.directive
        if text.startswith("append "):
            return shlex.split(text[len("append "):])
        return shlex.split(text) if text.startswith("--set") else []


def readme_blocks(text: str) -> list[Block]:
    """The fenced ``bash`` and ``python`` blocks of the README, with the directive above each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, language = i, fence.group(1)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        above = MARKER.match(lines[start - 1]) if start > 0 else None
        if language in ("bash", "python"):
            blocks.append(Block(language, "\n".join(body) + "\n", start + 1, above.group(1) if above else ""))
    return blocks


def block_commands(block: Block) -> list[list[str]]:
    """The ``jaxrlhf`` commands of a bash block as argument lists (continuations joined, comments dropped);
    anything else in a block that runs is an error naming the README line."""
    joined = re.sub(r"\\\n", " ", block.code)
    commands = []
    for offset, line in enumerate(joined.splitlines()):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0] == "jaxrlhf", (
            f"README.md:{block.line + 1 + offset}: a bash block runs only jaxrlhf commands (mark the block "
            f"'<!-- readme-test: skip (why) -->' otherwise): {line.strip()!r}")
        commands.append(words[1:] + block.extra_arguments())
    return commands


def config_keys(command: str) -> set[str]:
    return {d.key for d in describe_config(cli._resolve(cli.COMMANDS[command].config)) if not d.section}


def with_tiny_sizes(argv: list[str]) -> list[str]:
    """``argv`` plus the :data:`TINY` overrides its command's config has and it does not set itself."""
    given = {argv[i + 1].split("=")[0] for i, a in enumerate(argv[:-1]) if a == "--set"}
    keys = config_keys(argv[0]) if argv and argv[0] in cli.COMMANDS else set()
    extra = [o for o in TINY if o.split("=")[0] in keys and o.split("=")[0] not in given]
    return [*argv, *(a for o in extra for a in ("--set", o))]


def names_a_user_module(argv: list[str], workdir: Path) -> bool:
    """Whether an argument names ``module:function`` with the module in the working directory."""
    return any((workdir / f"{m}.py").is_file() for a in argv for m in re.findall(r"(\w+):\w+", a))


# ----------------------------------------------------------------------------- the user's files


def build_user_files(root: Path) -> None:
    """What a user has: the repository's configs, a Hugging Face model directory and JSONL data."""
    pytest.importorskip("torch")
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    shutil.copytree(REPO / "configs", root / "configs")
    rng = random.Random(0)
    words = "the sky is blue green red sea sun moon star cat dog runs jumps over a quick brown fox".split()

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    prompts = [sentence(2, 5) for _ in range(40)]
    rows = {
        "sft.jsonl": [{"prompt": p, "completion": " " + sentence(1, 4)} for p in prompts],
        "prefs.jsonl": [{"prompt": p, "chosen": " " + sentence(1, 3), "rejected": " " + sentence(3, 6)}
                        for p in prompts],
        "prompts.jsonl": [{"prompt": p, "answer": p.split()[-1]} for p in prompts],
    }
    for name, records in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([sentence(3, 12) for _ in range(400)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / MODEL_DIR)
    fast.save_pretrained(root / MODEL_DIR)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    build_user_files(root)
    return root


# ----------------------------------------------------------------------------- the tests


def test_the_readme_follows_the_test_convention():
    """Cheap checks first: the blocks parse, run only jaxrlhf commands, and name the files this suite
    provides (so that a README edit that breaks the convention fails here, by name)."""
    text = README.read_text()
    blocks = readme_blocks(text)
    for name in (*DATA_FILES, MODEL_DIR):
        assert name in text, f"the README no longer mentions {name}; update tests/test_readme.py"
    run = [b for b in blocks if not b.skipped]
    commands = [c for b in run if b.language == "bash" for c in block_commands(b)]
    assert {"sft", "reward", "ppo", "a2c", "demo"} <= {c[0] for c in commands}
    assert all(c[0] in cli.COMMANDS or (c[0] == "study" and c[1] in cli.STUDIES) for c in commands), (
        [c[:2] for c in commands])
    assert any(b.file_name == "my_rewards.py" for b in run) and any(
        b.language == "python" and b.file_name is None for b in run)
    for b in blocks:
        assert not b.directive or b.skipped or b.directive.startswith(("--set", "append ")), (
            f"README.md:{b.line}: unknown readme-test directive {b.directive!r}")


@pytest.mark.slow
def test_every_readme_command_runs_as_written(workdir, monkeypatch, capsys):
    """Each bash and python block of the README, in order, in the user's directory. Reports the README
    line of the first that fails, with its stderr."""
    blocks = [b for b in readme_blocks(README.read_text()) if not b.skipped]
    for block in blocks:
        if block.file_name:
            (workdir / block.file_name).write_text(block.code)
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ran, ran_argv, through_console_script = [], [], False
    printed: dict[str, str] = {}  # stdout of each command run in this process
    for block in blocks:
        if block.file_name:
            continue
        if block.language == "python":
            namespace: dict = {"__name__": "__readme__"}
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
            ran.append(f"{time.perf_counter() - started:5.1f} s  python block at README.md:{block.line}")
            if "generate" in block.code:  # the library snippet: host arrays the tokenizer decodes
                out = namespace["out"]
                assert isinstance(out.response_tokens, np.ndarray)
                texts = namespace["tokenizer"].batch_decode(out.response_tokens, skip_special_tokens=True)
                assert len(texts) == out.response_tokens.shape[0]
            continue
        for argv in block_commands(block):
            argv = with_tiny_sizes(argv)
            where = f"README.md:{block.line}: jaxrlhf {shlex.join(argv)}"
            started = time.perf_counter()
            if not through_console_script and names_a_user_module(argv, workdir):
                result = run_console_script(argv, workdir)
                assert result.returncode == 0, f"{where}\n{result.stderr[-3000:]}"
                through_console_script = True
            else:
                with contextlib.redirect_stdout(io.StringIO()) as out:
                    code = cli.main(argv)
                assert code == 0, f"{where}\n{capsys.readouterr().err[-3000:]}"
                printed[shlex.join(argv)] = out.getvalue()
            ran.append(f"{time.perf_counter() - started:5.1f} s  jaxrlhf {shlex.join(argv)}")
            ran_argv.append(argv)
    assert through_console_script, "no README command names a module of the working directory"
    print("\n".join(["README commands run:", *ran]))
    # What the commands promise, checked on what they left.
    assert (workdir / "runs" / "reward" / "export" / "config.json").is_file()
    assert json.loads((workdir / "runs" / "reward" / "export" / "config.json").read_text())[
        "architectures"][0].endswith("ForSequenceClassification")
    # A user oracle's report says its "optimal answers" are the task's optimum, not the oracle's.
    assert "not this oracle's" in (workdir / "runs" / "demo-my-gold" / "report.md").read_text()
    two = workdir / "runs" / "a2c-two-rewards" / "metrics.jsonl"
    metrics = [json.loads(line) for line in two.read_text().splitlines()]
    assert any("rewards/exact_answer/mean" in r and "rewards/brevity/mean" in r for r in metrics)
    # The studies' --quick smoke runs are the README's (each runs once in the suite); check what they wrote.
    studies = [argv for argv in ran_argv if argv[0] == "study"]
    assert sorted(argv[1] for argv in studies) == ["choices", "feedback"], [a[:2] for a in studies]
    for argv in studies:
        check_study_run(argv, workdir)
        # The summary says where the report is (the run directory's name has a timestamp).
        report = next((workdir / "runs").glob(f"study-{argv[1]}-*")) / "report.md"
        assert f"report: {report} " in printed[shlex.join(argv)], printed[shlex.join(argv)][-500:]


# ----------------------------------------------------------------------------- the studies' smoke runs


def study_config(argv: list[str]):
    """The config a ``jaxrlhf study NAME [--quick] [--set k=v …]`` command ran with."""
    return cli.config_from_args(cli.build_parser().parse_args(argv))


def check_study_run(argv: list[str], workdir: Path) -> None:
    """What a ``--quick`` study leaves: the report, results.json with intervals over its seeds for every
    variant, curves.npz, the plots and a config.yaml that reloads to the config it ran with; and, per
    study, that its variants did what they change."""
    cfg = study_config(argv)
    name, seeds = argv[1], cfg.run.seeds
    found = sorted((workdir / "runs").glob(f"study-{name}-*"))
    assert len(found) == 1, f"jaxrlhf {shlex.join(argv)}: expected one runs/study-{name}-* directory, {found}"
    root = found[0]
    for artefact in ("report.md", "results.json", "config.yaml", "curves.npz", "plots/gold_vs_sqrt_kl.png",
                     "plots/differences.png"):
        assert (root / artefact).is_file(), f"{root}: no {artefact}"
    assert cli.load_command_config(f"study {name}", str(root / "config.yaml"), []) == cfg
    results = json.loads((root / "results.json").read_text())
    variants = results["variants"]
    for variant, entry in variants.items():
        gold = entry["final_gold"]["estimate"]
        assert gold["unit"] == "seeds" and gold["n"] == seeds and gold["low"] <= gold["value"] <= gold["high"]
        assert (variant == "default") == ("delta_gold" not in entry), variant
    points = cfg.pipeline.evaluation.points
    assert np.load(root / "curves.npz")["default/gold"].shape[:2] == (seeds, points + 1)  # SFT + points
    report = (root / "report.md").read_text()
    assert f"over {seeds} seeds" in report and "Quick preset" in report
    if name == "choices":
        from jaxrlhf.experiments.studies.choices import CHOICES

        assert list(variants) == list(cfg.choices)
        assert CHOICES["separate_critic"].label in report
        # The structural variant moves the policy elsewhere than the defaults do (its own program; a few
        # tiny steps move the KL, not yet the sampled answers' gold).
        assert variants["separate_critic"]["per_seed"]["kl"] != variants["default"]["per_seed"]["kl"]
        mechanisms = dict(results["mechanisms"])
        assert set(mechanisms) == {"value-loss clipping (defaults)", "policy-ratio clipping (defaults)",
                                   "missing-EOS penalty (defaults)"}
        assert "## How often each mechanism acted" in report
        assert mechanisms["value-loss clipping (defaults)"] in report
    else:
        assert list(variants) == ["default", "rating", "flip_0.25"]
        agreement = {v: variants[v]["label_agreement"]["estimate"]["value"] for v in ("flip_0.25", "default")}
        assert agreement["flip_0.25"] < agreement["default"], agreement
        assert "ratings" in report


def run_console_script(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``jaxrlhf …`` through the installed console script (this tree first on the path)."""
    bin_dir = Path(sys.executable).parent
    script = shutil.which("jaxrlhf", path=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
    assert script, "the jaxrlhf console script is not installed (pip install -e .)"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([script, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
