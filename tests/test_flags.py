"""steptool.py's flags mean what they say: a flag given on the command line always wins, whatever its
value; without it the model's preset decides (tiny, smollm2, or none: the paper's values, Config's
defaults), chosen by what the model is, and --help shows each default and preset. Parsing only: no
model is loaded, no network is touched."""
import json
import os

import pytest

from harness import launch, models
import policy as P
import steptool

# the keys a preset or --quick sets, at the paper's values (Config's defaults), and each preset in full
SCHEDULE_KEYS = sorted({k for p in (*steptool.PRESETS.values(), steptool.QUICK) for k in p})
PAPER = {k: steptool.Config.__dataclass_fields__[k].default for k in SCHEDULE_KEYS}
TINY, SMOL = {**PAPER, **steptool.PRESETS["tiny"]}, {**PAPER, **steptool.PRESETS["smollm2"]}
SCHEDULES = {  # how a schedule is selected on the command line -> the values it gives
    "tiny": (["--model", "tiny"], TINY),
    "smollm2": (["--model", "smollm2"], SMOL),
    "paper": (["--model", "Qwen/Qwen2-7B"], PAPER),
    "quick": (["--quick"], {**TINY, **steptool.QUICK}),
    "smollm2 --quick": (["--model", "smollm2", "--quick"], {**SMOL, **steptool.QUICK}),
}
KEYS = [(name, key) for name, (_, values) in SCHEDULES.items()
        for key in (steptool.QUICK if "quick" in name else values)]


def as_flag(key, value):
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag[2:]]
    return [flag, str(value)]


def another(value):
    """A value of the same type that no schedule would pick by itself."""
    return (not value) if isinstance(value, bool) else value * 3 + 1 if isinstance(value, int) else value * 3 or 0.5


@pytest.fixture(autouse=True)
def nothing_is_fetched_or_loaded(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("parsing the flags fetched or loaded a model")
    for module, name in ((models, "fetch"), (models, "from_gguf"), (models, "load_policy"), (models, "build_tiny")):
        monkeypatch.setattr(module, name, refuse)


def test_without_flags_each_schedule_gives_its_own_values():
    for name, (select, values) in SCHEDULES.items():
        cfg = launch.parse_args(select)
        assert {k: getattr(cfg, k) for k in values} == values, name


def test_config_carries_the_papers_values_and_the_presets_change_only_config_fields():
    fields = steptool.Config.__dataclass_fields__
    assert all(set(p) <= set(fields) for p in (*steptool.PRESETS.values(), steptool.QUICK))
    assert not any(v is None for v in PAPER.values())   # a real value on every field a preset changes
    assert (PAPER["ppo_epochs"], PAPER["lr"], PAPER["episodes_per_iteration"], PAPER["init_kl_coef"]) == (4, 1e-5, 8, 0.3)


@pytest.mark.parametrize("name, key", KEYS, ids=[f"{n}:{k}" for n, k in KEYS])
def test_a_flag_given_wins_over_the_schedule_whatever_its_value(name, key):
    """Any value: another one, the schedule's own, one another schedule (or --quick) would pick, such as
    the paper's 4 PPO epochs under smollm2's schedule (2), or Config's plain default where it has one."""
    select, values = SCHEDULES[name]
    picks = {s[key] for s in (PAPER, TINY, SMOL, steptool.QUICK) if key in s}
    plain = steptool.Config.__dataclass_fields__[key].default
    for value in picks | {another(values[key])} | ({plain} if plain is not None else set()):
        got = getattr(launch.parse_args(select + as_flag(key, value)), key)
        assert got == value and type(got) is type(value), (value, got)
        flag_first = getattr(launch.parse_args(as_flag(key, value) + select), key)
        assert flag_first == value, (value, flag_first)   # wherever it stands on the line


def test_the_flags_that_used_to_be_overwritten_now_win():
    cfg = launch.parse_args(["--model", "smollm2", "--ppo-epochs", "4", "--save-every", "10"])
    assert (cfg.ppo_epochs, cfg.save_every) == (4, 10)
    assert launch.parse_args(["--quick", "--max-steps", "12"]).max_steps == 12
    assert launch.parse_args(["--quick", "--mini-batch-size", "2", "--grad-accum", "4"]).grad_accum == 4


def test_flags_outside_the_schedule_keep_their_plain_defaults_and_gradient_checkpointing_stays_unset():
    cfg = launch.parse_args(["--model", "Qwen/Qwen2-7B", "--quick"])
    assert cfg.sft_micro_batch_size == 4 and cfg.target_kl == 6.0 and cfg.gradient_checkpointing is None
    assert "gradient_checkpointing" not in SCHEDULE_KEYS
    assert launch.parse_args(["--gradient-checkpointing"]).gradient_checkpointing is True


def test_a_real_model_warms_up_with_sft_on_every_expert_episode_by_default():
    cfg = launch.parse_args(["--model", "Qwen/Qwen2-7B"])
    assert (cfg.sft_epochs, cfg.sft_lr, cfg.sft_episodes) == (1, 1e-4, 0)


# ---- the schedule follows what the model is: fake folders in the formats harness.models writes ----
def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


SMOL_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
               "num_hidden_layers": 30, "vocab_size": 49152, "num_attention_heads": 9}
TINY_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 2048, **models.TINY}


def converted(d, config=None):
    """models.fetch's cache folder: source.json (as from_gguf writes it for an alias) and the config."""
    a = models.ALIASES["smollm2"]
    write_json(os.path.join(d, "source.json"), {"sha256": a["sha256"], "format": models.FORMAT,
                                                "wheel": a["wheel"], "member": a["member"]})
    write_json(os.path.join(d, "config.json"), config or {"model_type": "llama"})  # the sha256 alone decides
    return d


def saved(d, config):
    """A save_pretrained folder (a run's base/, a copy): config.json, no source.json."""
    write_json(os.path.join(d, "config.json"), config)
    return d


def checkpoint(d, base, relative=None):
    """models.save_policy's policy.json; relative=None: an older one, without base_relative."""
    meta = {"base": base, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": list(P.LORA_TARGETS)},
            "full_finetune": False, "dtype": "float32", "gradient_checkpointing": False}
    write_json(os.path.join(d, "policy.json"), meta if relative is None else {**meta, "base_relative": relative})
    return d


def run_checkpoint(t, base_config):
    """A run's checkpoint/ on the run's own base/ (a changed or random base, written once per run)."""
    saved(str(t / "run" / "base"), base_config)
    return checkpoint(str(t / "run" / "checkpoint"), "../base", True)


def older_checkpoint(t):
    saved(str(t / "ck" / "base"), SMOL_CONFIG)
    return checkpoint(str(t / "ck"), "base")


def symlinked_checkpoint(t):
    run_checkpoint(t, SMOL_CONFIG)
    os.symlink(t / "run" / "checkpoint", t / "link")
    return str(t / "link")   # its ../base is beside the real folder, as models.load_policy reads it


def unreadable(t):
    (t / "bad").mkdir()
    (t / "bad" / "config.json").write_text("[1,")
    return str(t / "bad")


SMOL_CK, TINY_CK = {**SMOL, "sft_epochs": 0}, {**TINY, "sft_epochs": 0}
MODELS = {  # case: (make the model in tmp_path -> --model, the schedule it gets)
    "converted SmolLM2 folder (source.json)": (lambda t: converted(str(t / "cache" / "smollm2")), SMOL),
    "a copy of it (config sizes)": (lambda t: saved(str(t / "copy"), SMOL_CONFIG), SMOL),
    "checkpoint on the alias": (lambda t: checkpoint(str(t / "ck"), "smollm2", False), SMOL_CK),
    "checkpoint on the converted folder": (lambda t: checkpoint(str(t / "ck"), converted(str(t / "cache")), False), SMOL_CK),
    "checkpoint on its run's base/": (lambda t: run_checkpoint(t, SMOL_CONFIG), SMOL_CK),
    "older checkpoint with base/ inside": (older_checkpoint, SMOL_CK),
    "checkpoint reached through a symlink": (symlinked_checkpoint, SMOL_CK),
    "tiny run's checkpoint": (lambda t: run_checkpoint(t, TINY_CONFIG), TINY_CK),
    "checkpoint on tiny": (lambda t: checkpoint(str(t / "ck"), "tiny", False), TINY_CK),
    "saved tiny model": (lambda t: saved(str(t / "tiny"), TINY_CONFIG), TINY),
    "another Qwen2 folder": (lambda t: saved(str(t / "q"), {**TINY_CONFIG, "hidden_size": 64}), PAPER),
    "checkpoint on a hub id": (lambda t: checkpoint(str(t / "ck"), "Qwen/Qwen2-7B", False),
                               {**PAPER, "sft_epochs": 0}),
    "hub id": (lambda t: "Qwen/Qwen2-7B", PAPER),
    "missing folder": (lambda t: str(t / "no" / "such" / "model"), PAPER),
    "folder with unreadable JSON": (unreadable, PAPER),
}


@pytest.mark.parametrize("case", MODELS)
def test_the_schedule_is_chosen_by_what_the_model_is_not_by_its_name(tmp_path, case):
    make, expected = MODELS[case]
    model = make(tmp_path)
    cfg = launch.parse_args(["--model", model])
    assert {k: getattr(cfg, k) for k in PAPER} == expected
    assert {**PAPER, **launch.defaults(model)} == expected   # harness.compare's view of it


def test_a_flag_still_wins_over_a_checkpoints_schedule(tmp_path):
    ck = checkpoint(str(tmp_path / "ck"), "smollm2", False)
    cfg = launch.parse_args(["--model", ck, "--sft-epochs", "1", "--ppo-epochs", "4"])
    assert (cfg.sft_epochs, cfg.ppo_epochs, cfg.iterations) == (1, 4, SMOL["iterations"])


# ---- --help --------------------------------------------------------------------------------
def help_sections(capsys):
    """--help's text -> {flag: its option's text, whitespace collapsed}."""
    with pytest.raises(SystemExit) as e:
        launch.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out.split("\noptions:\n")[1]
    sections = {}
    for part in ("\n" + text).split("\n  --")[1:]:
        flag = "--" + part.split()[0].rstrip(",")
        sections[flag] = " ".join(("--" + part).split())
    return sections


def test_help_shows_each_default_and_preset_and_never_a_default_of_none(capsys):
    sections = help_sections(capsys)
    assert not any("None" in s for s in sections.values())
    assert sections["--ppo-epochs"].endswith("PPO epochs per batch (default: 4; smollm2 2; --quick 1)")
    assert sections["--mini-batch-size"].endswith("(default: 2)")
    assert "(default: 1; tiny 7; --quick 1)" in sections["--sft-epochs"] and "our checkpoints: 0" in sections["--sft-epochs"]
    for key in SCHEDULE_KEYS:
        s = sections["--" + key.replace("_", "-")]
        assert f"(default: {PAPER[key]}" in s, s
        for name, preset in (*steptool.PRESETS.items(), ("--quick", steptool.QUICK)):
            shown = f"; {name} {preset[key]}" in s if key in preset else f"; {name} " in s
            assert shown == (key in preset), (name, s)
    assert sections["--target-kl"].endswith("(default: 6.0)")
